"""Device selection, inference mode, micro-batching and per-stage timing.

Every task runs its network through :func:`run_batched` so that GPU specifics
(channels-last, autocast, memory budget) live in one place.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from inference.errors import TaskError

log = logging.getLogger(__name__)

__all__ = ["StageTimer", "autocast_context", "device_prefetch", "prefetch_map", "prepare_model", "run_batched", "select_device",
           "to_channels_last"]

T = TypeVar("T")
R = TypeVar("R")

STAGES: tuple[str, ...] = ("load", "preprocess", "forward", "postprocess", "write")


def select_device(preference: str | torch.device = "auto") -> torch.device:
    """``"auto"`` gives CUDA when available, else CPU; ``"cuda"`` without a GPU is an error.

    Raises
    ------
    TaskError
        If CUDA is requested but not available, or the name is unknown.
    """
    if isinstance(preference, torch.device):
        return preference
    pref = str(preference).lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TaskError("device 'cuda' requested but no CUDA GPU is available")
        return torch.device(pref)
    raise TaskError(f"unknown device {preference!r}; use auto, cpu or cuda")


def _uses_2d_convs(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in channels-last memory when it has 2-D convolutions, on every device.

    Channels-last is faster on CUDA and, on the oneDNN CPU path, also on CPU
    (``benchmarks/channels_last.py``, figures in benchmarks/README.md). Convolutions
    pick the layout from their weights, so inputs need no conversion.
    """
    return model.to(memory_format=torch.channels_last) if _uses_2d_convs(model) else model


def prepare_model(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move to ``device``, switch to eval mode, and use channels-last memory for 2-D conv nets."""
    device = select_device(device)
    return to_channels_last(model.to(device).eval())


def autocast_context(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` (float16) on CUDA, a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _bytes_per_item(t: torch.Tensor) -> int:
    return t.element_size() * t.numel()


def auto_batch_size(sample: torch.Tensor, max_batch: int, memory_budget_bytes: int | None, factor: float = 64.0) -> int:
    """Largest batch <= ``max_batch`` whose estimated activation memory fits the budget.

    The estimate is ``factor`` times the input size per item; it errs on the safe side for
    the small networks used here. With no budget, ``max_batch`` is returned.
    """
    if memory_budget_bytes is None:
        return max(1, max_batch)
    per = max(1.0, _bytes_per_item(sample) * factor)
    return max(1, min(max_batch, int(memory_budget_bytes // per)))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _cat_outputs(outs: list[object]) -> object:
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, dim=0)  # type: ignore[arg-type]
    if isinstance(first, dict):
        return {k: _cat_outputs([o[k] for o in outs]) for k in first}  # type: ignore[index]
    if isinstance(first, (list, tuple)):
        if first and isinstance(first[0], dict):  # detection-style list of per-image dicts
            return [item for o in outs for item in o]  # type: ignore[union-attr]
        return type(first)(_cat_outputs([o[i] for o in outs]) for i in range(len(first)))  # type: ignore[index]
    raise TypeError(f"cannot concatenate model outputs of type {type(first).__name__}")


def run_batched(
    model: torch.nn.Module | Callable[[torch.Tensor], object],
    tensors: torch.Tensor | Sequence[torch.Tensor],
    max_batch: int,
    device: torch.device | str,
    *,
    memory_budget_bytes: int | None = None,
    amp: bool = True,
    output_device: torch.device | str = "cpu",
) -> object:
    """Run ``model`` over items in micro-batches under ``torch.inference_mode``.

    Parameters
    ----------
    tensors:
        One stacked tensor ``(N, ...)`` or a sequence of per-item tensors of equal shape
        (slices of several jobs may be mixed).
    max_batch:
        Upper bound on items per forward call.
    memory_budget_bytes:
        Optional cap that lowers the batch size (see :func:`auto_batch_size`).
    amp:
        Use float16 autocast on CUDA.
    output_device:
        Where the concatenated outputs end up (CPU by default, for post-processing).

    Returns
    -------
    object
        The outputs concatenated along dim 0: a tensor, a dict/tuple of tensors, or a list of
        per-item dicts for detection models. Floating outputs are returned as float32.
    """
    device = select_device(device)
    if isinstance(tensors, torch.Tensor):
        items = tensors
        n = int(items.shape[0])
    else:
        if not tensors:
            raise ValueError("run_batched needs at least one tensor")
        items = torch.stack(list(tensors))
        n = len(tensors)
    if n == 0:
        raise ValueError("run_batched needs at least one item")
    bs = auto_batch_size(items[0], max_batch, memory_budget_bytes)
    outs: list[object] = []
    out_dev = torch.device(output_device)
    with torch.inference_mode(), autocast_context(device, amp):
        for start in range(0, n, bs):
            x = _to_device(items[start:start + bs], device)
            outs.append(_move(model(x), out_dev))
    return _cat_outputs(outs)


def _move(obj: object, device: torch.device) -> object:
    if isinstance(obj, torch.Tensor):
        t = obj.to(device)
        return t.float() if t.is_floating_point() else t
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device) for v in obj)
    return obj


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int = 2, ahead: int | None = None,
                 processes: bool = True, executor: Executor | None = None) -> Iterator[R]:
    """``map(fn, items)`` in worker processes (or threads), in order, keeping ``ahead`` results queued.

    Pre-processing (DICOM decode, resampling) runs here while the caller runs the
    network on earlier results, so the accelerator is not starved. ``workers == 0``
    runs inline. ``fn`` and the items must be picklable when ``processes`` is true.
    A long-lived ``executor`` (e.g. the node's pre-processing pool) may be passed
    instead; it is not shut down here.
    """
    if executor is None and workers <= 0:
        yield from map(fn, items)
        return
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
    from multiprocessing import get_context

    if ahead is None:
        ahead = 2 * max(int(getattr(executor, "_max_workers", 0) or 0), workers, 1)
    own = executor is None
    pool = executor or (ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) if processes
                        else ThreadPoolExecutor(max_workers=workers))
    with pool if own else contextlib.nullcontext(pool):
        pending: collections.deque = collections.deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(pool.submit(fn, item))
                break
            yield result


def _to_device_tree(obj: object, device: torch.device) -> object:
    if isinstance(obj, torch.Tensor):
        if device.type == "cuda":
            return obj.pin_memory().to(device, non_blocking=True)
        return obj
    if isinstance(obj, dict):
        return {k: _to_device_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device_tree(v, device) for v in obj)
    return obj


def _record_stream(obj: object, stream: torch.cuda.Stream) -> None:
    """Tell the caching allocator that tensors made on the copy stream are used on ``stream``."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, dict):
        for v in obj.values():
            _record_stream(v, stream)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _record_stream(v, stream)


def device_prefetch(items: Iterable[T], device: torch.device | str, *, depth: int = 3) -> Iterator[T]:
    """Iterate ``items`` while a background thread fetches the next ones and copies their tensors to ``device``.

    Receiving a pre-processed item (from :func:`prefetch_map`) and its host-to-device
    copy (pinned, on a separate CUDA stream) then overlap the network's work on the
    previous item. On CPU it only overlaps the receiving. Errors are re-raised here.
    """
    import queue
    import threading

    device = select_device(device)
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def feed() -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for item in items:
                    moved = _to_device_tree(item, device)
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    while not stop.is_set():
                        try:
                            q.put((moved, event), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            q.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((exc, None))

    thread = threading.Thread(target=feed, name="device-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, event = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                _record_stream(item, current)
            yield item
    finally:
        stop.set()


def n_batches(n: int, batch: int) -> int:
    """Number of micro-batches for ``n`` items."""
    return math.ceil(n / max(1, batch))


@dataclass
class StageTimer:
    """Accumulates wall-clock seconds per named stage (load, preprocess, forward, postprocess, write).

    Examples
    --------
    >>> t = StageTimer()
    >>> with t.stage("load"):
    ...     pass
    >>> sorted(t.seconds)
    ['load']
    """

    seconds: dict[str, float] = field(default_factory=dict)
    sync_cuda: bool = False

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block and add it to ``seconds[name]``."""
        if self.sync_cuda and torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_cuda and torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def merge(self, other: dict[str, float]) -> None:
        """Add another timing dict into this one."""
        for k, v in other.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + float(v)

    @property
    def total(self) -> float:
        """Sum over all stages."""
        return sum(self.seconds.values())

    def log_line(self) -> str:
        """``load=0.12s preprocess=...`` in the canonical stage order, then any others."""
        keys = [k for k in STAGES if k in self.seconds] + sorted(k for k in self.seconds if k not in STAGES)
        return " ".join(f"{k}={self.seconds[k]:.3f}s" for k in keys)
