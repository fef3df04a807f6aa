"""Runtime: device selection, micro-batching, stage timings."""

from __future__ import annotations

import time

import pytest
import torch

from inference.errors import TaskError
from inference.runtime import StageTimer, auto_batch_size, prepare_model, run_batched, select_device


def test_select_device() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TaskError):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TaskError):
            select_device("cuda")


def test_run_batched_matches_full_batch_and_counts_calls() -> None:
    torch.manual_seed(0)
    net = prepare_model(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 3)),
                        "cpu")
    assert not net.training
    x = torch.randn(10, 1, 8, 8)
    calls = []

    def model(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[0])
        return net(t)

    out = run_batched(model, x, max_batch=4, device="cpu")
    assert calls == [4, 4, 2]
    with torch.inference_mode():
        assert torch.allclose(out, net(x), atol=1e-6)
    # a list of per-item tensors (slices of several jobs) and dict outputs
    out2 = run_batched(lambda t: {"logits": net(t), "n": torch.arange(t.shape[0])}, list(x), 3, "cpu")
    assert out2["logits"].shape == (10, 3) and out2["n"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    # detection-style list of dicts is flattened per image
    out3 = run_batched(lambda t: [{"boxes": torch.zeros(1, 4)} for _ in range(t.shape[0])], x, 4, "cpu")
    assert len(out3) == 10
    with pytest.raises(ValueError):
        run_batched(net, [], 4, "cpu")


def test_prepare_model_uses_channels_last_for_2d_conv_nets_on_cpu() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3)).eval()
    x = torch.randn(3, 2, 12, 12)
    with torch.inference_mode():
        expected = conv(x).clone()
    net = prepare_model(conv, "cpu")
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not net[0].weight.is_contiguous()
    with torch.inference_mode():
        assert torch.allclose(net(x), expected, atol=1e-5)
    mlp = prepare_model(torch.nn.Linear(3, 2), "cpu")
    assert mlp.weight.is_contiguous()


def test_memory_budget_limits_batch() -> None:
    x = torch.zeros(1, 64, 64)  # 16 KiB per item
    assert auto_batch_size(x, 32, None) == 32
    assert auto_batch_size(x, 32, 16384 * 64 * 4) == 4
    assert auto_batch_size(x, 32, 1) == 1


def test_stage_timer() -> None:
    t = StageTimer()
    with t.stage("load"):
        time.sleep(0.01)
    with t.stage("forward"):
        pass
    with t.stage("load"):
        time.sleep(0.01)
    assert t.seconds["load"] >= 0.02 and t.total >= t.seconds["load"]
    assert t.log_line().startswith("load=") and "forward=" in t.log_line()
    t.merge({"write": 1.0})
    assert t.seconds["write"] == 1.0


def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("workers,processes", [(0, True), (2, False), (2, True)])
def test_prefetch_map_keeps_order(workers: int, processes: bool) -> None:
    from inference.runtime import prefetch_map

    assert list(prefetch_map(_square, range(20), workers=workers, ahead=3, processes=processes)) == [
        i * i for i in range(20)]


def test_device_prefetch_order_and_errors() -> None:
    from inference.runtime import device_prefetch

    items = [(torch.full((2,), float(i)), {"i": i}) for i in range(7)]
    got = list(device_prefetch(iter(items), "cpu", depth=2))
    assert [int(g[1]["i"]) for g in got] == list(range(7)) and torch.equal(got[3][0], items[3][0])

    def broken():
        yield torch.zeros(1)
        raise RuntimeError("decode failed")

    it = device_prefetch(broken(), "cpu")
    assert torch.equal(next(it), torch.zeros(1))
    with pytest.raises(RuntimeError, match="decode failed"):
        next(it)
    # abandoning the iterator early does not hang
    gen = device_prefetch(iter(range(100)), "cpu", depth=1)
    assert next(gen) == 0
    gen.close()
