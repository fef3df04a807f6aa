"""The README's main job: synthetic studies through a real Orthanc, the node, and back.

1. ``dicomnode-train synth`` writes a few synthetic studies for each of the five tasks.
2. A local Orthanc (Debian's binary) starts with the node registered as modality ``bonenode``.
3. ``dicomnode serve`` starts with a config derived from ``config/node.yaml`` (ports, storage, models).
4. The studies are uploaded to Orthanc, and Orthanc C-STOREs each one to the node.
5. The script waits until each study's AI results (SR, and SEG/SC) are stored back in Orthanc, prints a table
   (study, task, finding, latency), renders every overlay to PNG, and leaves Orthanc running with its web address
   printed until Ctrl-C (or exits at once with ``--no-wait``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
                            "--seed", str(seed + i)], check=True)
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


def _study_uid(folder: Path) -> str:
    first = next(iter(sorted(folder.rglob("*.dcm"))))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def _concept_name(item: pydicom.Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""


def _group_text(children: pydicom.Sequence) -> str:
    """"<site> <finding>: <qualitative value> (p=...)", "<finding> <volume> mL" or "<site>: <finding>"."""
    codes: dict[str, str] = {}
    nums: dict[str, float] = {}
    for child in children:
        if child.get("ValueType") == "CODE" and "ConceptCodeSequence" in child:
            codes.setdefault(_concept_name(child), str(child.ConceptCodeSequence[0].CodeMeaning))
        elif child.get("ValueType") == "NUM" and child.get("MeasuredValueSequence"):
            nums.setdefault(_concept_name(child), float(child.MeasuredValueSequence[0].NumericValue))
    finding, site = codes.get("Finding", ""), codes.get("Finding Site", "")
    if not finding:
        return ""
    if finding in codes:  # qualitative evaluation named after the finding, e.g. "Fracture = Absent"
        p = nums.get(finding)
        prob = f" (p={p:.2f})" if p is not None and 0.0 <= p <= 1.0 else ""
        return f"{site} {finding.lower()}: {codes[finding]}{prob}".strip()
    if "Volume" in nums:
        return f"{finding} {nums['Volume'] / 1000.0:.0f} mL"
    return f"{site}: {finding}" if site else finding


def _finding_text(sr: pydicom.Dataset) -> str:
    """A one-line summary of the SR's findings: "<finding site>: <finding>" per measurement group (TID 1500)."""
    parts: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "CONTAINER" and _concept_name(item) == "Measurement Group":
                parts.append(_group_text(item.get("ContentSequence", [])))
            elif "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.get("ContentSequence", []))
    text = "; ".join(dict.fromkeys(p for p in parts if p))
    return (text[:87] + "...") if len(text) > 90 else (text or "(see SR)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "demo-out"))
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for all results")
    ap.add_argument("--no-wait", action="store_true", help="stop everything after the table instead of waiting")
    ap.add_argument("--per-task", type=int, default=None, help="at most this many studies per task (CI: 1)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    missing = [t for t in TASKS if not (REPO / "models" / t / "current").exists()]
    if missing:
        print(f"warning: no demo bundle for {', '.join(missing)}; those studies will end as failed jobs")

    print("1/5 synthetic studies")
    studies = _synth(out / "studies", args.seed, args.per_task)
    node_port = free_port()
    print("2/5 starting Orthanc")
    pacs = OrthancServer(out / "orthanc", {"bonenode": ("BONENODE", "127.0.0.1", node_port)}, name="bone-demo")
    pacs.start()
    node = None
    try:
        print(f"    Orthanc web UI: {pacs.url}/app/explorer.html   (DICOM port {pacs.dicom_port})")
        print("3/5 starting the node")
        http_port = free_port()
        cfg = _node_config(REPO / "config" / "node.yaml", out, node_port, pacs, http_port)
        log = open(out / "node.log", "ab")  # noqa: SIM115 - closed at exit
        node = subprocess.Popen([str(BIN / "dicomnode"), "serve", "--config", str(cfg)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while not pacs.echo_modality("bonenode"):
            if node.poll() is not None or time.monotonic() > deadline:
                print(f"error: the node did not start; see {out / 'node.log'}")
                return 1
            time.sleep(0.5)
        print(f"    node status page: http://127.0.0.1:{http_port}/   (metrics: /metrics)")
        print("4/5 Orthanc sends each study to the node")
        sent: dict[str, tuple[str, float]] = {}
        for task, folders in studies.items():
            for folder in folders:
                ids = pacs.upload_dir(folder)
                uid = _study_uid(folder)
                t0 = time.monotonic()
                pacs.store_to_modality("bonenode", ids)
                sent[uid] = (task, t0)
        print("5/5 waiting for the AI results in Orthanc")
        done: dict[str, float] = {}
        deadline = time.monotonic() + args.timeout
        while len(done) < len(sent) and time.monotonic() < deadline:
            for uid, (_task, t0) in sent.items():
                if uid in done:
                    continue
                insts = pacs.instances_in_study(uid)
                if any(i.get("Modality") == "SR" for i in insts):
                    done[uid] = time.monotonic() - t0
            time.sleep(1.0)
        png_dir = out / "overlays"
        png_dir.mkdir(exist_ok=True)
        print()
        print(f"{'study':<28} {'task':<16} {'latency':>8}  finding")
        for uid, (task, _t0) in sent.items():
            lat = f"{done[uid]:.1f}s" if uid in done else "timeout"
            finding = "-"
            for inst in pacs.instances_in_study(uid):
                if str(inst.get("SeriesDescription") or "").startswith("AI "):
                    raw = pacs.get_file(inst["ID"])
                    f = out / "results" / f"{inst['SOPInstanceUID']}.dcm"
                    f.parent.mkdir(exist_ok=True)
                    f.write_bytes(raw)
                    ds = pydicom.dcmread(f)
                    if ds.Modality == "SR":
                        finding = _finding_text(ds)
                    elif ds.Modality in ("OT", "SEG") or "SecondaryCapture" in ds.SOPClassUID.name.replace(" ", ""):
                        subprocess.run([str(BIN / "dicomnode"), "render", str(f), "--out",
                                        str(png_dir / f"{task}_{inst['SOPInstanceUID'][-12:]}.png")],
                                       check=False, capture_output=True)
            print(f"...{uid[-25:]:<25} {task:<16} {lat:>8}  {finding}")
        print(f"\noverlays written to {png_dir}")
        print(f"node status: {BIN / 'dicomnode'} status --config {cfg}")
        if len(done) < len(sent):
            print(f"warning: {len(sent) - len(done)} studies have no results yet; see {out / 'node.log'}")
        if not args.no_wait:
            print(f"\nOrthanc keeps running at {pacs.url}/app/explorer.html -- press Ctrl-C to stop everything.")
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        return 0 if len(done) == len(sent) else 1
    finally:
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        pacs.stop()
        print("stopped")


if __name__ == "__main__":
    sys.exit(main())
