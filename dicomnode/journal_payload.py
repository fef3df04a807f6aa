"""A journal record's payload left in the journal file (see :mod:`dicomnode.journal`)."""

from __future__ import annotations

import errno
import os

__all__ = ["JournalPayload"]


class JournalPayload:
    """A record's payload left in the journal file: copied into a spool file by the kernel, read only when needed.

    Moving a record with :meth:`copy_to` costs no Python buffer (no 512 KiB allocation, page faults and two
    user-space copies per instance, as ``pread`` + ``write`` did); ``bytes(payload)`` reads it.
    """

    __slots__ = ("_fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd, self.offset, self.length = fd, offset, length

    def __len__(self) -> int:
        return self.length

    def __bytes__(self) -> bytes:
        data = os.pread(self._fd, self.length, self.offset)
        if len(data) != self.length:
            raise OSError(f"journal record cut short ({len(data)} of {self.length} bytes)")
        return data

    def copy_to(self, out_fd: int) -> None:
        """Write the payload at the current position of ``out_fd`` (``copy_file_range``, else read and write)."""
        done = 0
        try:
            while done < self.length:
                n = os.copy_file_range(self._fd, out_fd, self.length - done, self.offset + done)
                if n <= 0:
                    raise OSError(f"journal record cut short ({done} of {self.length} bytes)")
                done += n
        except OSError as exc:
            if done or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.write(out_fd, bytes(self))
