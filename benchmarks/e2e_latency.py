"""End-to-end latency: study complete -> SR stored in Orthanc, through a real Orthanc and ``dicomnode serve``.

For ``wrist_fracture`` a 2-image adult wrist study (synthetic, 640x512) is uploaded to Orthanc and C-STOREd to
the node, whose config routes it with the example adult-wrist rule (quiet period ``--quiet-s``) to the task with a
pinned bundle. Measured per study:

* ``complete -> SR in Orthanc``: from the node's ``studies.completed_at`` (the moment the assembler declares the
  study complete) to the first poll (every 20 ms) that finds the SR in Orthanc.
* peer, measured in the same run on the same machine: the in-process
  :func:`dicomnode.processing.process_study` of the same study with the same bundle (task + result writers, no
  queue, no network, model already loaded). ``e2e / in-process`` is the cost of the node around the compute
  (job queue, worker, outbox, C-STORE to Orthanc, Orthanc storing it).

The first study after start-up includes loading the model (cold); the remaining ones are warm. Without
``--model`` a faithful-size ResNet18 bundle is trained for one step on a few synthetic studies: latency does not
depend on the weights. ``--write-readme`` puts the row into benchmarks/README.md, section "End-to-end latency"
(other tasks' rows there are kept).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402
from tests.orthanc import OrthancServer  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
RESULTS = ROOT / "benchmarks" / "results" / "e2e_latency_wrist_fracture.json"
SECTION = "## End-to-end latency"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
TASK = "wrist_fracture"


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "training.cli", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_data(work: Path, n: int) -> Path:
    """``n`` synthetic adult wrist studies (seed 7)."""
    data = work / "data"
    _cli("synth", TASK, "--out", str(data), "--n", str(n), "--seed", "7", "--workers", "2")
    return data


def make_bundle(work: Path, data: Path) -> Path:
    """A faithful-size bundle (ResNet18, 341x512) trained for one step (weights do not change the latency)."""
    bundle = work / "bundle"
    _cli("train", TASK, "--data", str(data), "--out", str(bundle), "--epochs", "1", "--device", "cpu",
         "--synthetic", "--version", "bench", "--set", "max_steps_per_epoch=1", "--set", "batch_size=4",
         "--set", "n_boot=10")
    return bundle


def two_image_studies(data: Path) -> list[Path]:
    """Study folders with exactly two images."""
    rows = [json.loads(line) for line in (data / "labels.jsonl").read_text().splitlines() if line.strip()]
    return [data / r["study_uid"] for r in rows if len(list((data / r["study_uid"]).rglob("*.dcm"))) == 2]


def node_config(work: Path, port: int, pacs_port: int, bundle: Path, quiet_s: float, device: str) -> Path:
    """Node config with the example config's adult-wrist route, model pinned."""
    example = yaml.safe_load((ROOT / "config" / "node.yaml").read_text(encoding="utf-8"))
    route = next(r for r in example["routes"] if r["task"] == TASK)
    route.update({"complete_after_s": quiet_s, "model": str(bundle), "send_to": ["pacs"]})
    cfg = {
        "node": {"ae_title": "BONENODE", "host": "127.0.0.1", "port": port, "storage_dir": str(work / "var"),
                 "disk_min_free_gb": 0, "workers": 1,
                 "allowed_callers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"}]},
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}},
        "models_dir": str(work / "models"), "device": device, "routes": [route], "log_level": "INFO",
    }
    path = work / "node.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _query(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _wait(pred, timeout_s: float, interval_s: float = 0.02):  # noqa: ANN001, ANN202 - tiny local helper
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval_s)
    raise TimeoutError("timed out")


def in_process(study: Path, bundle: Path, device: str) -> float:
    """Seconds of one :func:`process_study` on ``study`` (files read inside the timing, as the node does)."""
    from dicomnode.processing import process_study
    from dicomnode.results import ResultContext
    from inference.tasks import TaskContext

    t0 = time.perf_counter()
    process_study(sorted(study.rglob("*.dcm")), TASK, TaskContext(model_dir=bundle, device=device), ResultContext())
    return time.perf_counter() - t0


def run(n_studies: int, quiet_s: float, device: str, model: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        work = Path(tmp)
        data = make_data(work, n_studies + 4)
        bundle = model or make_bundle(work, data)
        studies = two_image_studies(data)[:n_studies]
        if len(studies) < n_studies:
            raise RuntimeError(f"only {len(studies)} two-image studies generated")
        node_port = free_port()
        pacs = OrthancServer(work / "orthanc", {"node": ("BONENODE", "127.0.0.1", node_port)})
        pacs.start()
        cfg = node_config(work, node_port, pacs.dicom_port, bundle, quiet_s, device)
        log = open(work / "node.log", "ab")  # noqa: SIM115 - closed below
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        db = work / "var" / "node.db"
        latencies, totals, peer = [], [], []
        in_process(studies[0], bundle, device)  # load the model once in this process (the node's is warm too)
        try:
            _wait(lambda: pacs.echo_modality("node"), 60, 0.2)
            for study in studies:
                uid = str(pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
                pacs.upload_dir(study)
                t_send = time.time()
                pacs.store_to_modality("node", [pacs.study_id(uid)])

                def sr_seen(uid: str = uid) -> float | None:
                    found = pacs.find("Series", {"StudyInstanceUID": uid, "Modality": "SR"})
                    return time.time() if found else None

                t_sr = _wait(sr_seen, 300)
                (completed,) = _wait(lambda uid=uid: _query(db, "SELECT completed_at FROM studies WHERE study_uid=?"
                                                             " AND completed_at IS NOT NULL", (uid,)), 30)
                latencies.append(t_sr - float(completed[0]))
                totals.append(t_sr - t_send)
                _wait(lambda uid=uid: not _query(db, "SELECT 1 FROM deliveries WHERE study_uid=? AND state!='sent'",
                                                 (uid,)), 60, 0.1)
                peer.append(in_process(study, bundle, device))  # node idle: same machine, same moment
        finally:
            node.terminate()
            node.wait(60)
            log.close()
            pacs.stop()
    warm = latencies[1:] or latencies
    return {
        "task": TASK, "n_studies": n_studies, "images_per_study": 2, "quiet_s": quiet_s, "device": device,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
        "model": "given" if model else "faithful ResNet18 (1 training step)",
        "latency_cold_s": latencies[0], "latency_warm_median_s": statistics.median(warm),
        "latencies_s": latencies, "send_to_sr_s": totals, "in_process_median_s": statistics.median(peer[1:] or peer),
        "in_process_s": peer, "date": dt.date.today().isoformat(),
    }


HEADER = ("| task | study | device | complete -> SR in Orthanc, warm median (s) | cold, first study (s) | "
          "in-process process_study (s) | e2e / in-process | C-STORE start -> SR (s, incl. quiet period) |\n"
          "|---|---|---|---|---|---|---|---|")


def render_row(res: dict) -> str:
    ratio = res["latency_warm_median_s"] / res["in_process_median_s"]
    dev = f"{res['device']} ({res['cores']} cores)" if res["device"] == "cpu" else res["device"]
    return (f"| {res['task']} | 2 DX images 640x512, {res['n_studies']} studies | {dev} | "
            f"{res['latency_warm_median_s']:.2f} | {res['latency_cold_s']:.2f} | {res['in_process_median_s']:.2f} | "
            f"{ratio:.2f} | {statistics.median(res['send_to_sr_s']):.2f} |")


def write_readme(row: str, note: str) -> None:
    """Insert or replace this task's row in the "End-to-end latency" section; other sections stay untouched."""
    text = README.read_text() if README.exists() else "# Benchmarks\n\nMeasured figures; each section says how.\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n`python benchmarks/e2e_latency.py`: {note}\n\n{HEADER}\n{row}\n"
        README.write_text(text)
        return
    end = text.find("\n## ", start + 1)
    end = len(text) if end < 0 else end + 1
    body = text[start:end]
    lines = body.rstrip("\n").split("\n")
    prefix = f"| {row.split('|')[1].strip()} |"
    same_device = row.split("|")[3].strip()
    lines = [ln for ln in lines if not (ln.startswith(prefix) and ln.split("|")[3].strip() == same_device)]
    if HEADER.split("\n")[0] not in body:
        lines += ["", HEADER]
    last_row = max(i for i, ln in enumerate(lines) if ln.startswith("|"))
    lines.insert(last_row + 1, row)  # keep the rows together, notes below the table stay below
    README.write_text(text[:start] + "\n".join(lines) + "\n" + ("\n" if end < len(text) else "") + text[end:])


NOTE = ("a 2-image adult wrist study is C-STOREd from a real Orthanc to `dicomnode serve` (example adult-wrist "
        "route, quiet period 1 s, model pinned); latency runs from the node's `completed_at` to the first 20 ms "
        "poll that finds the SR in Orthanc. The peer is the in-process `process_study` of the same study "
        "(task + result writers, model loaded) in the same run; `e2e / in-process` is the node's overhead "
        "factor (queue, worker, outbox, C-STORE, Orthanc storing).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=4, help="studies sent one after the other (first is cold)")
    ap.add_argument("--quiet-s", type=float, default=1.0, help="route complete_after_s")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--model", type=Path, help="bundle to pin (default: a faithful-size one-step bundle)")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.studies, args.quiet_s, args.device, args.model.resolve() if args.model else None)  # the node resolves paths from its config dir
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2))
    row = render_row(res)
    print(json.dumps(res, indent=2))
    print(HEADER)
    print(row)
    if args.write_readme:
        write_readme(row, NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
