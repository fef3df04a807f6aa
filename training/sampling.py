"""Seeding, the per-epoch sampler and the seeded DataLoader of :mod:`training.trainer`."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from training.data import RecordDataset

if TYPE_CHECKING:
    from training.train_config import TrainConfig

__all__ = ["EpochSampler", "balanced_indices", "make_loader", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) and ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def balanced_indices(labels: Sequence[int], rng: np.random.Generator) -> list[int]:
    """One balanced epoch: each class contributes minority-class-size samples drawn without replacement.

    For two classes that is 2 x minority per epoch (the wrist spec); the result is shuffled.
    """
    lab = np.asarray(labels)
    classes = [c for c in np.unique(lab)]
    if not classes:
        return []
    per = min(int(np.sum(lab == c)) for c in classes)
    chosen = np.concatenate([rng.choice(np.nonzero(lab == c)[0], size=per, replace=False) for c in classes])
    rng.shuffle(chosen)
    return [int(i) for i in chosen]


class EpochSampler(torch.utils.data.Sampler[int]):
    """Deterministic per-epoch order (shuffled or class-balanced), sharded by DDP rank.

    The order depends only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, n: int, *, seed: int, labels: Sequence[int] | None = None, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.labels, self.shuffle = n, seed, labels, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch``."""
        self.epoch = epoch

    def _indices(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.labels is not None:
            idx = balanced_indices(self.labels, rng)
        elif self.shuffle:
            idx = [int(i) for i in rng.permutation(self.n)]
        else:
            idx = list(range(self.n))
        if self.world_size > 1:
            total = math.ceil(len(idx) / self.world_size) * self.world_size
            idx = (idx + idx[: total - len(idx)])[self.rank:total:self.world_size]
        return idx

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
    torch.set_num_threads(1)


def make_loader(ds: RecordDataset, cfg: TrainConfig, collate: Callable | None, *, sampler: EpochSampler | None = None,
                batch_size: int | None = None, epoch_seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader with seeded workers (the generator fixes worker seeds and any random ops)."""
    g = torch.Generator()
    g.manual_seed(epoch_seed)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size or cfg.batch_size, sampler=sampler, shuffle=False, num_workers=cfg.num_workers,
        collate_fn=collate, worker_init_fn=_worker_init if cfg.num_workers else None, generator=g,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
    )
