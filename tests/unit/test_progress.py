"""Long training work shows progress: log lines when piped, a tqdm bar on a terminal (training/progress.py)."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from training.progress import EVERY_S_ENV, Progress, TrackedLoader, track

REPO = Path(__file__).resolve().parents[2]


def _synth_cmd(out: Path, n: int) -> list[str]:
    return [sys.executable, "-m", "training.cli", "synth", "wrist_fracture", "--out", str(out), "--n", str(n),
            "--seed", "3", "--workers", "1"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def test_synth_piped_prints_progress_lines(tmp_path: Path) -> None:
    out = subprocess.run(_synth_cmd(tmp_path / "set", 3), cwd=tmp_path, env=_env(**{EVERY_S_ENV: "0"}),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "synth wrist_fracture:" in ln]
    assert "synth wrist_fracture: 0/3 studies" in lines[0]  # announced at once
    assert re.search(r"1/3 studies \(33%\), \d+ s elapsed, about \d+ s left", lines[1]), lines
    assert "2/3 studies (67%)" in lines[2] and re.search(r"3 studies in \d+ s$", lines[3]), lines
    assert "\r" not in out.stderr and "it/s" not in out.stderr  # no bar in a pipe


def test_synth_on_a_terminal_draws_a_bar(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows x 120 columns
    try:
        proc = subprocess.Popen(_synth_cmd(tmp_path / "set", 2), cwd=tmp_path, env=_env(**{EVERY_S_ENV: "0"}),
                                stdout=subprocess.DEVNULL, stderr=secondary)
        os.close(secondary)
        chunks: list[bytes] = []
        while True:
            try:
                data = os.read(primary, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=300) == 0
    finally:
        os.close(primary)
    text = b"".join(chunks).decode(errors="replace")
    assert re.search(r"synth wrist_fracture: +0%\|.*\| 0/2 \[.*studies/s\]", text), text  # tqdm bar
    assert "0/2 studies\n" not in text.replace("\r", "")  # no log lines on a terminal


def test_piped_lines_are_periodic(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clock = iter(float(t) for t in range(0, 1000, 4))  # each call: 4 s later
    monkeypatch.setattr("training.progress.time.monotonic", lambda: next(clock))
    monkeypatch.setenv(EVERY_S_ENV, "10")
    caplog.set_level(logging.INFO, logger="training.progress")
    with Progress(10, "work", "items", stream=io.StringIO()) as p:
        for _ in range(10):
            p.update()
    msgs = [r.getMessage() for r in caplog.records]
    # updates at 4, 8, 12, ... s: a line only once 10 s have passed since the last, and a final line
    assert msgs[0].startswith("work: 3/10 items (30%), 12 s elapsed, about 28 s left"), msgs
    assert msgs[1].startswith("work: 6/10 items"), msgs
    assert msgs[-1].startswith("work: 10 items in ") and len(msgs) == 4, msgs


def test_quick_work_stays_quiet_and_loader_keeps_its_attributes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert list(track(range(5), desc="quick")) == [0, 1, 2, 3, 4]
    assert not [r for r in caplog.records if "quick" in r.getMessage()]

    class Loader:
        dataset = "the dataset"

        def __iter__(self):  # noqa: ANN204
            return iter([1, 2])

        def __len__(self) -> int:
            return 2

    tracked = TrackedLoader(Loader(), "eval")
    assert tracked.dataset == "the dataset" and len(tracked) == 2 and list(tracked) == [1, 2]
