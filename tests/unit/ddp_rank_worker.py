"""torchrun entry for the rank-agreement test: train the toy task one step per rank and dump each rank's weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from tests.unit.toy_adapter import ADAPTER, ToyConfig
from training.data import SplitConfig, records_from_rows, split_records
from training.trainer import TrainConfig, train


def main(data: str, out: str) -> None:
    torch.set_num_threads(1)
    built: list[torch.nn.Module] = []
    original = ADAPTER.build_model

    def capture(cfg: ToyConfig) -> torch.nn.Module:
        built.append(original(cfg))
        return built[-1]

    ADAPTER.build_model = capture  # type: ignore[method-assign]
    rows = json.loads((Path(data) / "rows.json").read_text())
    split = split_records(records_from_rows(rows, data), SplitConfig(train=0.5, val=0.25, holdout=0.25))
    cfg = TrainConfig(epochs=1, batch_size=2, lr=5e-2, device="cpu", amp=False, version="ddp-ranks")
    train(ADAPTER, split, Path(out), cfg, ToyConfig(), work_dir=Path(out + ".work"))
    state = {k: v.detach().cpu().clone() for k, v in built[0].state_dict().items()}
    torch.save(state, f"{out}.rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
