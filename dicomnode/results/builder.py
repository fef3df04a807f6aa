"""The one entry point of the result writers: Findings -> SEG, SR and SC datasets."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom import Dataset

from dicomnode.errors import ResultWriteError
from dicomnode.results import ResultContext
from dicomnode.results.common import sort_sources, validate_sources
from dicomnode.results.sc import build_scs
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_sr
from inference.findings import Findings

log = logging.getLogger(__name__)


def build_results(findings: Findings, sources: Sequence[Dataset], context: ResultContext) -> list[Dataset]:
    """Build every result object of one task run on one study.

    Parameters
    ----------
    findings:
        The task's findings.
    sources:
        Every source dataset the task read, with pixel data loaded (any order).
    context:
        Series UIDs/numbers, predecessors and equipment. Series UIDs and
        numbers that were missing are created and written back into
        ``context.series_uids`` / ``context.series_numbers`` so the caller can
        persist them for a re-run.

    Returns
    -------
    list of pydicom.Dataset
        In sending order: the SEG (if the findings have masks), then the SR
        (which references the SEG), then one secondary capture per overlay.
        Every object has a fresh SOP Instance UID.

    Raises
    ------
    ResultWriteError
        If the findings and sources are inconsistent or an object cannot be built.
    """
    by_uid = validate_sources(sources, findings)
    ordered = sort_sources(by_uid.values())
    out: list[Dataset] = []
    seg = None
    try:
        if findings.masks:
            seg = build_seg(findings, ordered, context)
            out.append(seg)
        out.append(build_sr(findings, ordered, by_uid, context, seg=seg))
        out.extend(build_scs(findings, by_uid, context))
    except ResultWriteError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ResultWriteError(f"cannot build {findings.task} results: {exc}") from exc
    log.info(
        "built %d result object(s) for task %s: %s", len(out), findings.task,
        ", ".join(str(ds.Modality) for ds in out),
    )
    return out
