"""Wake-ups for the node's polling threads (assembler, workers, sender).

Each stage polls its table every ``poll_s`` so that nothing is missed after a
crash or a change made by another process; the stage before it wakes it when it
has just added work, so a study does not wait out a poll interval per stage.
"""

from __future__ import annotations

import threading


class Wakeup:
    """Lets threads sleep until :meth:`wake` or a timeout; a wake is never lost.

    A thread takes a :meth:`token` *before* looking for work and then calls
    :meth:`wait` with it: a wake that happened in between returns at once, and
    one :meth:`wake` releases every waiting thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def token(self) -> int:
        """The number of wakes so far; pass it to :meth:`wait`."""
        return self._count

    def wake(self) -> None:
        """Release every waiting thread and any thread about to wait with an older token."""
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def wait(self, token: int, timeout_s: float) -> None:
        """Sleep up to ``timeout_s`` unless :meth:`wake` was called since ``token`` was taken."""
        with self._cond:
            if self._count == token:
                self._cond.wait(timeout_s)
