"""The README's main job: synthetic studies through a real Orthanc, the node, and back.

1. ``dicomnode-train synth`` writes a few synthetic studies for each of the five tasks.
2. A local Orthanc (Debian's binary) starts with the node registered as modality ``bonenode``.
3. ``dicomnode serve`` starts with a config derived from ``config/node.yaml`` (ports, storage, models).
4. The studies are uploaded to Orthanc, and Orthanc C-STOREs each one to the node.
5. The script waits until each study's AI results (SR, and SEG/SC) are stored back in Orthanc, prints a table
   (accession and patient alias, task, latency, the SR's key finding in full, the synthetic truth), renders
   every overlay to PNG, writes ``index.html`` and ``viewer.txt`` (the viewer's address, a link per study:
   Orthanc Explorer, and OHIF where ``dicomnode.viewer`` and the OHIF web app are installed) and leaves
   Orthanc running until Ctrl-C (or exits at once with ``--no-wait``).

Studies whose results Orthanc already holds (an earlier run into the same ``--out``) are not sent again and
the run says so; ``--fresh`` forgets them. The node starts with an empty storage folder on every run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo_report import StudyRow, finding_text, study_identity, synthetic_truth, table, write_links  # noqa: E402

from dicomnode.devpacs import OrthancServer, free_port  # noqa: E402

TASKS = {  # task -> number of synthetic studies in the demo
    "wrist_fracture": 2,
    "physis_fracture": 2,
    "spine_bmd": 1,
    "hrpqct_motion": 1,
    "knee_bone_seg": 1,
}
BIN = Path(sys.executable).parent


def _synth(out: Path, seed: int, per_task: int | None = None) -> dict[str, list[Path]]:
    """Generate the demo studies (at most ``per_task`` per task when given); return task -> study folders."""
    studies: dict[str, list[Path]] = {}
    for i, (task, n) in enumerate(TASKS.items()):
        n = min(n, per_task) if per_task else n
        dest = out / task
        if not dest.exists():
            print(f"  generating {n} synthetic {task} studies ...", flush=True)
            subprocess.run([str(BIN / "dicomnode-train"), "synth", task, "--out", str(dest), "--n", str(n),
                            "--seed", str(seed + i)], check=True, stdout=subprocess.DEVNULL)  # progress: stderr
        studies[task] = sorted(p for p in dest.iterdir() if p.is_dir() and any(p.rglob("*.dcm")))[:n]
    return studies


def _node_config(base: Path, out: Path, port: int, pacs: OrthancServer, http_port: int) -> Path:
    cfg = yaml.safe_load(base.read_text(encoding="utf-8"))
    cfg["node"].update(port=port, storage_dir=str(out / "var"), disk_min_free_gb=0.5, status_http_port=http_port)
    cfg["node"]["allowed_callers"] = [{"ae_title": pacs.aet, "host": "127.0.0.1"}]
    cfg["destinations"]["pacs"].update(port=pacs.dicom_port, ae_title=pacs.aet)
    cfg["models_dir"] = str(REPO / "models")
    for route in cfg["routes"]:
        route["complete_after_s"] = 3
    path = out / "node.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _viewer_module() -> Any:
    """``dicomnode.viewer`` (OHIF served same-origin with Orthanc's DICOMweb) where this checkout has it."""
    try:
        return importlib.import_module("dicomnode.viewer")
    except ModuleNotFoundError as exc:
        if exc.name not in ("dicomnode.viewer", "dicomnode"):
            raise
        return None


def _start_pacs(out: Path, node_port: int, viewer: Any) -> tuple[OrthancServer, str]:
    """Orthanc, with the DICOMweb plugin when OHIF can be served; returns it and why OHIF cannot be, if so."""
    modalities = {"bonenode": ("BONENODE", "127.0.0.1", node_port)}
    if viewer is None:
        note = "dicomnode/viewer.py is not in this checkout"
    elif not Path(getattr(viewer, "DICOMWEB_PLUGIN", "/nonexistent")).exists():
        note = "Debian's orthanc-dicomweb plugin is not installed"
    else:
        pacs = viewer.DicomWebOrthanc(out / "orthanc", modalities, name="bone-demo")
        return pacs.start(), ""
    return OrthancServer(out / "orthanc", modalities, name="bone-demo").start(), note


def _start_viewer(viewer: Any, pacs: OrthancServer, note: str) -> tuple[Any, str]:
    """The OHIF viewer server for ``pacs`` (started), or None and the reason."""
    if note:
        return None, note
    try:
        return viewer.ViewerServer(pacs.url).start(), ""
    except (getattr(viewer, "ViewerError", OSError), OSError) as exc:
        return None, str(exc)


def _has_results(pacs: OrthancServer, uid: str) -> bool:
    """True when Orthanc already holds this study's AI results (an earlier demo run sent them)."""
    return any(i.get("Modality") == "SR" and str(i.get("SeriesDescription") or "").startswith("AI ")
               for i in pacs.instances_in_study(uid))


def _send(pacs: OrthancServer, studies: dict[str, list[Path]]) -> tuple[list[StudyRow], dict[str, float]]:
    """Upload and send every study that has no results yet; return all rows and the send times of those sent."""
    rows: list[StudyRow] = []
    sent: dict[str, float] = {}
    for task, folders in studies.items():
        truth = synthetic_truth(task, folders[0].parent) if folders else {}
        for folder in folders:
            uid, accession, patient = study_identity(folder)
            row = StudyRow(uid=uid, task=task, accession=accession, patient=patient, truth=truth.get(uid, "-"))
            rows.append(row)
            if _has_results(pacs, uid):
                row.latency = "earlier"
                continue
            ids = pacs.upload_dir(folder)
            sent[uid] = time.monotonic()
            pacs.store_to_modality("bonenode", ids)
    return rows, sent


def _wait(pacs: OrthancServer, rows: list[StudyRow], sent: dict[str, float], timeout: float) -> None:
    """Wait until each sent study's SR is in Orthanc; fill in the latencies."""
    deadline = time.monotonic() + timeout
    waiting = {r.uid: r for r in rows if r.uid in sent}
    while waiting and time.monotonic() < deadline:
        for uid, row in list(waiting.items()):
            if _has_results(pacs, uid):
                row.latency = f"{time.monotonic() - sent[uid]:.1f}s"
                del waiting[uid]
        time.sleep(1.0)


def _collect(pacs: OrthancServer, row: StudyRow, out: Path, render: bool) -> None:
    """Download the study's AI results; read the SR's finding; render SC/SEG overlays of this run to PNG."""
    png_dir = out / "overlays"
    png_dir.mkdir(exist_ok=True)
    for inst in pacs.instances_in_study(row.uid):
        if not str(inst.get("SeriesDescription") or "").startswith("AI "):
            continue
        f = out / "results" / f"{inst['SOPInstanceUID']}.dcm"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(pacs.get_file(inst["ID"]))
        ds = pydicom.dcmread(f)
        if ds.Modality == "SR":
            row.finding = finding_text(ds)
            continue
        png = png_dir / f"{row.name}_{row.task}_{inst['SOPInstanceUID'][-12:]}.png"
        if render and (ds.Modality in ("OT", "SEG") or "SecondaryCapture" in ds.SOPClassUID.name.replace(" ", "")):
            subprocess.run([str(BIN / "dicomnode"), "render", str(f), "--out", str(png)], check=False,
                           capture_output=True)
        if png.exists():
            row.overlays.append(str(png.relative_to(out)))


def _report(pacs: OrthancServer, viewer_srv: Any, note: str, rows: list[StudyRow], sent: dict[str, float],
            out: Path, *, default_out: bool) -> None:
    """Print the table and what was (not) reprocessed; write index.html and viewer.txt."""
    for row in rows:
        _collect(pacs, row, out, render=row.uid in sent)
        study_id = pacs.study_id(row.uid)
        row.explorer_url = f"{pacs.url}/app/explorer.html#study?uuid={study_id}" if study_id else ""
        if viewer_srv is not None:
            row.viewer_url = viewer_srv.study_url(row.uid)
    print()
    print(table(rows))
    earlier = [r for r in rows if r.latency == "earlier"]
    again = "make demo-clean && make demo" if default_out else f"scripts/demo.py --fresh --out {out}"
    if earlier and not sent:
        print(f"\nNothing was reprocessed: all {len(rows)} studies already have AI results in this demo's Orthanc "
              f"from an earlier run ({out / 'orthanc'}); the table shows those results. To process them again: "
              f"{again}.")
    elif earlier:
        print(f"\n{len(earlier)} of {len(rows)} studies already had results from an earlier run and were not sent "
              "again (latency 'earlier'); --fresh processes every study again.")
    files = write_links(out, rows, pacs.url, viewer_srv.url if viewer_srv is not None else None, note)
    print(f"\noverlays: {out / 'overlays'}\nlinks per study: {files[0]}  (text: {files[1]})")
    print(f"OHIF viewer: {viewer_srv.url}" if viewer_srv is not None else f"OHIF viewer not available: {note}")


def _start_node(out: Path, node_port: int, pacs: OrthancServer) -> tuple[subprocess.Popen[bytes], Path, int]:
    """``dicomnode serve`` with a fresh storage folder (results of earlier runs live on in Orthanc)."""
    shutil.rmtree(out / "var", ignore_errors=True)
    http_port = free_port()
    cfg = _node_config(REPO / "config" / "node.yaml", out, node_port, pacs, http_port)
    log = open(out / "node.log", "ab")  # noqa: SIM115 - the child keeps it; closed with this process
    node = subprocess.Popen([str(BIN / "dicomnode"), "serve", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return node, cfg, http_port


def _wait_for_stop() -> None:
    """Block until Ctrl-C (SIGINT) or SIGTERM; either one ends in the caller's clean stop of Orthanc and the node."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "demo-out"))
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for all results")
    ap.add_argument("--no-wait", action="store_true", help="stop everything after the table instead of waiting")
    ap.add_argument("--per-task", type=int, default=None, help="at most this many studies per task (CI: 1)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results (Orthanc, node) and process again")
    args = ap.parse_args()
    args.default_out = args.out == ap.get_default("out")
    return args


def main() -> int:
    args = _args()
    out = Path(args.out).resolve()
    if args.fresh:
        for sub in ("orthanc", "var", "results", "overlays"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    missing = [t for t in TASKS if not (REPO / "models" / t / "current").exists()]
    if missing:
        print(f"warning: no demo bundle for {', '.join(missing)}; those studies will end as failed jobs")

    print("1/5 synthetic studies")
    studies = _synth(out / "studies", args.seed, args.per_task)
    node_port = free_port()
    print("2/5 starting Orthanc")
    viewer = _viewer_module()
    pacs, note = _start_pacs(out, node_port, viewer)
    node = viewer_srv = None
    try:
        viewer_srv, note = _start_viewer(viewer, pacs, note)
        print(f"    Orthanc Explorer: {pacs.url}/app/explorer.html   (DICOM port {pacs.dicom_port})")
        if viewer_srv is not None:
            print(f"    OHIF viewer: {viewer_srv.url}")
        print("3/5 starting the node")
        node, cfg, http_port = _start_node(out, node_port, pacs)
        deadline = time.monotonic() + 60
        while not pacs.echo_modality("bonenode"):
            if node.poll() is not None or time.monotonic() > deadline:
                print(f"error: the node did not start; see {out / 'node.log'}")
                return 1
            time.sleep(0.5)
        print(f"    node status page: http://127.0.0.1:{http_port}/   (metrics: /metrics)")
        print("4/5 Orthanc sends each study to the node")
        rows, sent = _send(pacs, studies)
        if sent:
            print(f"5/5 waiting for the AI results of {len(sent)} studies in Orthanc")
        else:
            print("5/5 nothing sent: every study has AI results from an earlier run")
        _wait(pacs, rows, sent, args.timeout)
        _report(pacs, viewer_srv, note, rows, sent, out, default_out=args.default_out)
        print(f"node status: {BIN / 'dicomnode'} status --config {cfg}")
        late = [r for r in rows if r.latency == "timeout"]
        if late:
            print(f"warning: {len(late)} studies have no results yet; see {out / 'node.log'}")
        if not args.no_wait:
            print(f"\nOrthanc keeps running at {pacs.url}/app/explorer.html -- press Ctrl-C to stop everything.")
            _wait_for_stop()
        return 0 if not late else 1
    finally:
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        if viewer_srv is not None:
            viewer_srv.stop()
        pacs.stop()
        print("stopped")


if __name__ == "__main__":
    sys.exit(main())
