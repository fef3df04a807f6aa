"""The toy task on the inference side (test double): datasets -> Findings through the shared model cache."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydicom import Dataset

from inference.findings import ABSENT, FRACTURE, PRESENT, Classification, Findings
from inference.runtime import StageTimer, run_batched
from inference.series import load_series
from inference.tasks import TaskContext, register_task
from inference.tasks.base import image_refs, model_for

NAME = "toy_square"


def toy_task(datasets: Sequence[Dataset], context: TaskContext) -> Findings:
    """Probability that a bright square is present, from the current (or pinned) toy bundle."""
    timer = StageTimer()
    with timer.stage("load"):
        loaded = model_for(NAME, context)
        series = load_series(datasets)
    with timer.stage("preprocess"):
        scale = float(loaded.meta.input.extra.get("scale_hu", 1000.0))
        x = torch.from_numpy(np.clip(series.volume() / scale, -1, 1).astype(np.float32)).unsqueeze(1)
    with timer.stage("forward"):
        logits = run_batched(loaded.model, x, 8, loaded.device)
    with timer.stage("postprocess"):
        p = float(torch.sigmoid(logits[:, 0]).max())
    return Findings(
        task=NAME, algorithm_name=loaded.meta.algorithm_name, algorithm_version=loaded.version,
        study_instance_uid=str(datasets[0].StudyInstanceUID), source_images=image_refs(series.datasets),
        classifications=[Classification(FRACTURE, PRESENT if p >= 0.5 else ABSENT, probability=p)],
        synthetic_model=loaded.meta.synthetic_only, timings_s=dict(timer.seconds),
    )


register_task(NAME, toy_task)
