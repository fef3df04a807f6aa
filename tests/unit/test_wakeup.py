"""Wakeup: a wake between taking the token and waiting is not lost; one wake releases every waiter."""

from __future__ import annotations

import threading
import time

from dicomnode.wakeup import Wakeup


def test_wake_after_token_returns_at_once_and_timeout_without() -> None:
    w = Wakeup()
    token = w.token()
    w.wake()  # e.g. work was added while the thread was still looking
    t0 = time.monotonic()
    w.wait(token, 30.0)
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    w.wait(w.token(), 0.2)  # nothing new: sleeps the timeout
    assert time.monotonic() - t0 >= 0.19


def test_one_wake_releases_every_waiter() -> None:
    w = Wakeup()
    token = w.token()
    done: list[float] = []
    threads = [threading.Thread(target=lambda: (w.wait(token, 30.0), done.append(time.monotonic())))
               for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    w.wake()
    for t in threads:
        t.join(5)
    assert len(done) == 3
