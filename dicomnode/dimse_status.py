"""DIMSE statuses and association rejections of the receiving edge, shared by both receivers.

Exceptions from :mod:`dicomnode.errors` become statuses here and nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dicomnode.errors import DicomNodeError, InvalidDatasetError, OutOfResourcesError
from dicomnode.metrics import instance_rejected, instance_stored
from dicomnode.spool import StoreOutcome

log = logging.getLogger(__name__)

__all__ = [
    "RJ_APP_CONTEXT", "RJ_CALLED_AE", "RJ_CALLING_AE", "RJ_LOCAL_LIMIT", "RJ_NO_REASON", "RJ_PROTOCOL_VERSION",
    "STATUS_CANNOT_UNDERSTAND", "STATUS_DATASET_MISMATCH", "STATUS_OUT_OF_RESOURCES", "STATUS_PROCESSING_FAILURE",
    "STATUS_SOP_CLASS_NOT_SUPPORTED", "STATUS_SUCCESS", "STATUS_UNRECOGNIZED_OPERATION", "DataSetMismatchError",
    "store_status",
]

STATUS_SUCCESS = 0x0000
#: PS3.4 B.2.3 "Refused: Out of Resources": only when the node lacks disk space or cannot write (senders retry)
STATUS_OUT_OF_RESOURCES = 0xA700
#: PS3.4 B.2.3 "Error: Data Set does not match SOP Class" (A900-A9FF): the data set's SOP Class / Instance UID
#: differ from the Affected SOP Class / Instance UID of its C-STORE-RQ
STATUS_DATASET_MISMATCH = 0xA900
#: PS3.4 B.2.3 "Error: Cannot understand" (C000-CFFF): a data set the node cannot parse
STATUS_CANNOT_UNDERSTAND = 0xC210
#: PS3.7 Annex C, general status "Failure: Processing failure" (0110H): anything else that went wrong in the node
STATUS_PROCESSING_FAILURE = 0x0110
#: PS3.7 Annex C, general status "Refused: SOP Class not supported" (0122H): the Affected SOP Class UID of a
#: C-STORE-RQ is not the abstract syntax of the presentation context it was sent on (as pynetdicom answers)
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: PS3.7 Annex C, general status "Failure: Unrecognized operation" (0211H): a DIMSE service the node does not
#: provide (C-FIND, N-ACTION, ...)
STATUS_UNRECOGNIZED_OPERATION = 0x0211

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
RJ_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE title not recognised
RJ_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE title not recognised
RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit exceeded
RJ_NO_REASON = (0x02, 0x01, 0x01)  # rejected-transient, service-user, no reason given (disk low)
RJ_APP_CONTEXT = (0x01, 0x01, 0x02)  # rejected-permanent, service-user, application context name not supported
RJ_PROTOCOL_VERSION = (0x01, 0x02, 0x02)  # rejected-permanent, service-provider (ACSE), protocol version


class DataSetMismatchError(InvalidDatasetError):
    """The data set names another SOP class or instance than its C-STORE-RQ (answered 0xA900)."""


def store_status(sop: str, aid: str | None, fn: Callable[[], Any]) -> int:
    """Run a store step and map its outcome to a DIMSE status (the network edge)."""
    try:
        outcome = fn()
    except OutOfResourcesError as exc:
        log.error("C-STORE %s on association %s: out of resources: %s", sop, aid, exc)
        instance_rejected("out_of_resources")
        return STATUS_OUT_OF_RESOURCES
    except DataSetMismatchError as exc:
        log.error("C-STORE %s on association %s: data set does not match its request: %s", sop, aid, exc)
        instance_rejected("invalid_dataset")
        return STATUS_DATASET_MISMATCH
    except InvalidDatasetError as exc:
        log.error("C-STORE %s on association %s: cannot understand the data set: %s", sop, aid, exc)
        instance_rejected("invalid_dataset")
        return STATUS_CANNOT_UNDERSTAND
    except DicomNodeError as exc:
        log.error("C-STORE %s on association %s failed: %s", sop, aid, exc)
        instance_rejected("processing_failure")
        return STATUS_PROCESSING_FAILURE
    except Exception:  # noqa: BLE001 - never let a bad instance take the node down
        log.exception("C-STORE %s on association %s: unexpected error", sop, aid)
        instance_rejected("unexpected_error")
        return STATUS_PROCESSING_FAILURE  # not 0xA700: senders retry "out of resources" forever
    if isinstance(outcome, StoreOutcome):
        if outcome is StoreOutcome.DUPLICATE:
            log.debug("C-STORE %s: duplicate, already stored", sop)
        instance_stored(outcome.value)
    return STATUS_SUCCESS
