"""Sustained ingest benchmark: a stream longer than the node's receive journals, node against dcmtk storescp.

Run through ``benchmarks/ingest.py --sustained N`` or ``--sustained-only`` (see that module and
``benchmarks/README.md``): N images of 512 KiB (default 2,000, about 1 GB) sent to the node and to dcmtk
storescp in the same run, over 1 and 4 associations, targets alternating within each repeat; the medians and
every run go into ``results/ingest_sustained.json`` and the README section "Sustained ingest".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (  # noqa: E402
    PDU,
    _provenance,
    make_images,
    node_target,
    storescp_target,
    timed_send,
    write_readme_section,
)

SUSTAINED_RESULTS = Path(__file__).with_name("results") / "ingest_sustained.json"
SUSTAINED_GOAL = 0.5  # node / storescp, issue #33


def run_sustained(n: int, processes: int, repeats: int = 1) -> dict:
    """N images (longer than the journals) to the node and to storescp, 1 and 4 associations, one run.

    Targets alternate within each repeat (round robin, ``sync`` before each) so a slow phase of the shared
    disk hits both; the medians are reported.
    """
    res: dict = {"n": n, "processes": processes, "pdu": PDU, "repeats": repeats, "rates": {}, "runs": {},
                 **_provenance()}
    with tempfile.TemporaryDirectory(prefix="ingest-sustained-") as tmp:
        tmp_path = Path(tmp)
        files = make_images(tmp_path / "images", n)
        res["size_mb"] = sum(f.stat().st_size for f in files) / 1e6
        targets = {"node": lambda w: node_target(w, processes), "storescp": storescp_target}
        for parallel in (1, 4):
            for r in range(repeats):
                for name, target in targets.items():
                    dt_ack, dt_idx, peak = timed_send(name, target, tmp_path / f"{name}-{parallel}-{r}", files,
                                                      parallel, rss=True)
                    runs = res["runs"].setdefault(f"{name}/{parallel}", [])
                    runs.append({"ack": n / dt_ack, "indexed": n / dt_idx, "peak_rss_mib": peak})
                    print(f"sustained {name:9s} {parallel} assoc, run {r + 1}: {n / dt_ack:7.1f} images/s acknowledged, "
                          f"{n / dt_idx:7.1f} until indexed, peak RSS {peak:.0f} MiB", flush=True)
            for name in targets:
                runs = res["runs"][f"{name}/{parallel}"]
                res["rates"][f"{name}/{parallel}"] = statistics.median(x["ack"] for x in runs)
                res["rates"][f"{name}/{parallel}/indexed"] = statistics.median(x["indexed"] for x in runs)
                res["rates"][f"{name}/{parallel}/peak_rss_mib"] = max(x["peak_rss_mib"] for x in runs)
    return res


def _sustained_history(keep: int = 4) -> list[dict]:
    """The previous run's summary (and its own history): the figures move between runs, so none is dropped."""
    if not SUSTAINED_RESULTS.exists():
        return []
    old = json.loads(SUSTAINED_RESULTS.read_text())
    r = old["rates"]
    summary = {"date": old["date"], "commit": old["commit"], **{
        f"{k}_{p}": r[f"{k}/{p}"] for k in ("node", "storescp") for p in (1, 4)}}
    summary.update({f"ratio_{p}": r[f"node/{p}"] / r[f"storescp/{p}"] for p in (1, 4)})
    return [summary, *old.get("history", [])][:keep]


def _sustained_pairs(res: dict) -> dict[int, list[float]]:
    """node / storescp rate of each repeat, paired run by run, for 1 and 4 associations."""
    runs = res.get("runs", {})
    return {p: [a["ack"] / b["ack"] for a, b in zip(runs.get(f"node/{p}", []), runs.get(f"storescp/{p}", []),
                                                     strict=True)] for p in (1, 4)}


def _sustained_rows(res: dict, pairs: dict[int, list[float]]) -> list[str]:
    """The table's rows, one per association count."""
    r = res["rates"]
    spread = {k: ", ".join(f"{x['ack']:.0f}" for x in v) for k, v in res.get("runs", {}).items()}
    rows = []
    for p in (1, 4):
        ratio = r[f"node/{p}"] / r[f"storescp/{p}"]
        rows.append(f"| {p} | {r[f'node/{p}']:.0f} | {r[f'node/{p}/indexed']:.0f} | {r[f'storescp/{p}']:.0f} "
                    f"| {ratio:.2f} | {'met' if ratio >= SUSTAINED_GOAL else '**missed**'} "
                    f"| {r[f'node/{p}/peak_rss_mib']:.0f} | {spread.get(f'node/{p}', '')} "
                    f"| {spread.get(f'storescp/{p}', '')} | {', '.join(f'{x:.2f}' for x in pairs[p])} |")
    return rows


def _sustained_verdict(res: dict, pairs: dict[int, list[float]]) -> str:
    """The sentence on this run's goal: missed (and where), met, or met by the medians only."""
    r = res["rates"]
    all_pairs = pairs[1] + pairs[4]
    missed = [p for p in (1, 4) if r[f"node/{p}"] / r[f"storescp/{p}"] < SUSTAINED_GOAL]
    if missed:
        return "The 0.5x goal is **missed** in this run: " + "; ".join(
            f"{p} association{'s' if p > 1 else ''} {r[f'node/{p}'] / r[f'storescp/{p}']:.2f}x" for p in missed) + "."
    return "The 0.5x goal is met by the medians of this run" + (
        f", but run by run the ratio ranges from {min(all_pairs):.2f} to {max(all_pairs):.2f}: on this shared "
        "machine the node sits at the edge of the goal, not clear of it."
        if min(all_pairs, default=1) < SUSTAINED_GOAL else ".")


def _sustained_footer(res: dict) -> list[str]:
    """Whether the goal holds across the listed runs, the run's notes, and the earlier runs."""
    r = res["rates"]
    history = res.get("history", [])
    met_runs = sum(min(h["ratio_1"], h["ratio_4"]) >= SUSTAINED_GOAL for h in history) + int(
        all(r[f"node/{p}"] / r[f"storescp/{p}"] >= SUSTAINED_GOAL for p in (1, 4)))
    lines = [""]
    if history and met_runs < 1 + len(history):
        lines.append(f"**Not reliably met:** the medians reach {SUSTAINED_GOAL}x storescp on both association "
                     f"counts in {met_runs} of the {1 + len(history)} runs listed here, so the goal cannot be "
                     "claimed for a sustained stream on this machine.")
    lines += [x for note in res.get("notes", []) for x in ("", note)]
    lines += [""] + [f"- Earlier run, {h['date']}, commit `{h['commit']}`: node / storescp (medians) "
                     f"{h['ratio_1']:.2f} on 1 association, {h['ratio_4']:.2f} on 4 "
                     f"({h['node_1']:.0f} vs {h['storescp_1']:.0f} and {h['node_4']:.0f} vs {h['storescp_4']:.0f} "
                     "images/s)." for h in history]
    return lines


def render_sustained(res: dict) -> str:
    """The README section of a sustained run (``res`` as written to the results JSON)."""
    pairs = _sustained_pairs(res)
    return "\n".join([
        "## Sustained ingest (longer than the journal)",
        "",
        f"`benchmarks/ingest.py --sustained-only`, {res['date']}, {res['machine']}, commit `{res['commit']}`. "
        f"{res['n']} CT images of 512x512 16-bit ({res['size_mb']:.0f} MB; the node's receive journals hold "
        f"{res['processes']} x 256 MiB) sent with dcmtk `storescu` (TCP_NODELAY=1, max PDU {res['pdu']}) to the "
        f"node ({res['processes']} receiver processes, journal on: every instance is `fdatasync`ed before its "
        "success status) and to dcmtk storescp (`--fork`, no fsync) in the same run, fresh storage each, run "
        f"with `nice -n 10` on the shared machine, median of {res.get('repeats', 1)} run(s) taken alternately. "
        "\"acknowledged\" is images / time until storescu finished; "
        "\"indexed\" until the last instance was also in the spool index. Goal (issue #33): node at least "
        f"{SUSTAINED_GOAL}x storescp, acknowledged.",
        "",
        "| associations | node, acknowledged (images/s) | node, indexed (images/s) | dcmtk storescp (images/s) "
        "| node / storescp (medians) | goal >= 0.5 | node peak RSS (MiB) | node, every run | storescp, every run "
        "| node / storescp, run by run |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *_sustained_rows(res, pairs),
        "",
        "storescp writes into the page cache and never waits for the disk, so its rate swings with the kernel's "
        "dirty-page state (see every run); the node answers each instance only after parsing the data set "
        "(since issue #33) and `fdatasync`ing its journal record (associations appending at the same time share "
        "one flush), and once the stream outgrows the journals it also waits for the spool to free room (batches "
        "of up to 32 MiB copied from the journal by the kernel, their files flushed with one file-system commit, "
        "one index transaction). `benchmarks/receiver_cpu.py` shows what sets the ratio on a given machine: the "
        "CPU time per instance of each (when both are starved of CPU) and the latency of one device flush (when "
        "the disk is busy; the node waits for one per instance and association, storescp for none). "
        + _sustained_verdict(res, pairs),
        *_sustained_footer(res),
        "",
        "",
    ])


def sustained_main(args: argparse.Namespace) -> None:
    """The ``--sustained``/``--sustained-only`` part of ``ingest.py``: measure (or re-render), print, write."""
    if args.render_only:
        sres = json.loads(SUSTAINED_RESULTS.read_text())
        if args.note:
            sres["notes"] = args.note
            SUSTAINED_RESULTS.write_text(json.dumps(sres, indent=2))
    else:
        sres = run_sustained(args.sustained or 2000, args.processes, args.repeats)
        sres["history"] = _sustained_history()
        SUSTAINED_RESULTS.parent.mkdir(exist_ok=True)
        SUSTAINED_RESULTS.write_text(json.dumps(sres, indent=2))
    ssec = render_sustained(sres)
    print(ssec)
    if args.write_readme:
        write_readme_section(ssec, "## Sustained ingest (longer than the journal)")
