"""Entry point for the torchrun test: the toy task trained with world size 2 (gloo, CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.unit.toy_adapter import ADAPTER, ToyConfig
from training.data import SplitConfig, records_from_rows, split_records
from training.trainer import TrainConfig, train


def main(data: str, out: str) -> None:
    torch.set_num_threads(1)
    rows = json.loads((Path(data) / "rows.json").read_text())
    split = split_records(records_from_rows(rows, data), SplitConfig(train=0.5, val=0.25, holdout=0.25))
    cfg = TrainConfig(epochs=2, batch_size=2, lr=5e-3, device="cpu", amp=False, version="ddp")
    train(ADAPTER, split, Path(out), cfg, ToyConfig(), work_dir=Path(out + ".work"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
