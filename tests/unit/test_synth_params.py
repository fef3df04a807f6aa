"""Generator parameters: typed, validated, the same from Python and from ``synth --param``; the preview shows them."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from training.cli import main
from training.synth import common, runner, wrist_fracture
from training.synth.cli import GENERATORS, load_generator
from training.synth.manifest import read_manifest
from training.synth.params import Param, check_params, parse_assignments

HRPQCT_SMALL = ["--param", "n=48", "--param", "n_views=48", "--param", "n_slices=8"]


def test_values_are_typed_and_checked() -> None:
    assert Param(int, "").coerce("n", "96") == 96 and Param(int, "").coerce("n", 96.0) == 96
    assert Param(float, "").coerce("x", "1.5") == 1.5 and Param(float, "").coerce("x", 2) == 2.0
    assert Param(str, "", ("a", "b")).coerce("s", "b") == "b"
    for spec, value, message in [(Param(int, ""), "1.5", "must be int"), (Param(int, ""), True, "must be int"),
                                 (Param(float, ""), "wide", "must be float"), (Param(str, ""), 3, "must be str"),
                                 (Param(str, "", ("a", "b")), "c", "one of a, b"),
                                 (Param(int, "", (0, 1)), "2", "one of 0, 1")]:
        with pytest.raises(common.SynthError, match=message):
            spec.coerce("p", value)
    spec = {"n": Param(int, "matrix")}
    assert check_params("t", {"n": "64"}, spec) == {"n": 64} and check_params("t", None, spec) == {}
    with pytest.raises(common.SynthError, match=r"unknown parameter\(s\) 'm' for t; it takes:\n  n \(int\): matrix"):
        check_params("t", {"m": 1}, spec)
    assert parse_assignments(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}
    for bad in (["a"], ["=1"], ["a=1", "a=2"]):
        with pytest.raises(common.SynthError, match="--param"):
            parse_assignments(bad)


def test_every_generator_rejects_a_misspelt_parameter_before_writing(tmp_path: Path) -> None:
    for task in GENERATORS:
        mod = load_generator(task)
        assert mod.PARAMS and all(isinstance(p, Param) for p in mod.PARAMS.values())  # type: ignore[attr-defined]
        with pytest.raises(common.SynthError, match=f"unknown parameter.*for {task}"):
            mod.generate(tmp_path / task, 1, 1, workers=1, params={"texture_sd_mx": 60})  # type: ignore[attr-defined]
        assert not (tmp_path / task).exists()
        # and takes its declared ones (no studies: only the check runs)
        name, spec = next((k, p) for k, p in sorted(mod.PARAMS.items()) if p.choices)  # type: ignore[attr-defined]
        mod.generate(tmp_path / f"{task}-ok", 0, 1, workers=1, params={name: spec.choices[-1]})  # type: ignore[attr-defined]
    # a generator that declares no parameters takes none
    with pytest.raises(common.SynthError, match="unknown parameter"):
        runner.generate_studies(tmp_path / "toy", 1, 1, lambda job: [], params={"n": 1})


def test_cli_params_are_the_python_params_and_the_preview_shows_them(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    sheets = {}
    for label in ("1", "0"):
        out = tmp_path / f"cli{label}"
        sheets[label] = tmp_path / f"sheet{label}.png"
        assert main(["synth", "wrist_fracture", "--out", str(out), "--n", "3", "--seed", "4", "--workers", "1",
                     "--param", f"force_label={label}", "--preview", str(sheets[label])]) == 0
        assert [r["label"] for r in read_manifest(out)] == [int(label)] * 3
    wrist_fracture.generate(tmp_path / "py", 3, 4, workers=1, params={"force_label": 1})

    def pixels(root: Path) -> list[bytes]:
        return [pydicom.dcmread(f).PixelData for f in sorted(root.rglob("*.dcm"))]

    assert pixels(tmp_path / "cli1") == pixels(tmp_path / "py")
    # the sheet is drawn from the studies just written: regenerating with the defaults drew the same sheet twice
    assert sheets["1"].read_bytes() != sheets["0"].read_bytes()

    assert main(["synth", "hrpqct_motion", "--out", str(tmp_path / "hr"), "--n", "2", "--seed", "5", "--workers", "1",
                 *HRPQCT_SMALL, "--param", "texture_sd_max=60"]) == 0
    assert all(r["texture_sd"] > 0 for r in read_manifest(tmp_path / "hr"))

    capsys.readouterr()
    assert main(["synth", "hrpqct_motion", "--param", "help"]) == 0
    assert "texture_sd_max (float)" in capsys.readouterr().out
    for bad in (["--param", "texture_sd_mx=60"], ["--param", "grade=6"], ["--param", "n"], ["--preview", "x.png"]):
        n = "0" if bad[0] == "--preview" else "1"
        assert main(["synth", "hrpqct_motion", "--out", str(tmp_path / "bad"), "--n", n, *bad]) == 2
        assert not (tmp_path / "bad").exists()
    assert main(["synth", "hrpqct_motion", "--n", "1"]) == 2  # no --out


def test_a_set_is_never_mixed_with_an_earlier_one(tmp_path: Path) -> None:
    out = tmp_path / "set"
    args = ["synth", "wrist_fracture", "--out", str(out), "--seed", "1", "--workers", "1"]
    assert main([*args, "--n", "3"]) == 0
    first = sorted(p.name for p in out.iterdir())
    # a second set into the same folder would leave the first one's studies beside a manifest without them
    with pytest.raises(common.SynthError, match="not empty"):
        wrist_fracture.generate(out, 2, 2, workers=1)
    assert main([*args, "--n", "2", "--seed", "2"]) == 2
    assert sorted(p.name for p in out.iterdir()) == first and len(read_manifest(out)) == 3
    # --overwrite replaces it: only the new studies are left, all in the manifest
    assert main([*args, "--n", "2", "--seed", "2", "--overwrite"]) == 0
    rows = read_manifest(out)
    assert len(rows) == 2 and {p.name for p in out.iterdir() if p.is_dir()} == {r["study_uid"] for r in rows}
    # ... but only a synthetic set: a folder without a manifest is never deleted
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["synth", "wrist_fracture", "--out", str(other), "--n", "1", "--overwrite"]) == 2
    assert (other / "notes.txt").read_text() == "keep me"
