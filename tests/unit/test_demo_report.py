"""The demo's report (scripts/demo_report.py): full findings read from SR content, wrapped table, truth, links."""

from __future__ import annotations

import sys
from pathlib import Path

from pydicom import Dataset
from pydicom.sequence import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from demo_report import StudyRow, finding_text, patient_alias, synthetic_truth, table, write_links  # noqa: E402


def _code(value: str, meaning: str) -> Sequence:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, "SCT", meaning
    return Sequence([c])


def _item(vt: str, name: str, **kw: object) -> Dataset:
    ds = Dataset()
    ds.ValueType, ds.ConceptNameCodeSequence = vt, _code("1", name)
    if vt == "CODE":
        ds.ConceptCodeSequence = _code("2", str(kw.pop("code")))
    if vt == "NUM":
        mv = Dataset()
        mv.NumericValue, mv.MeasurementUnitsCodeSequence = str(kw.pop("value")), _code(str(kw.pop("unit")), "u")
        ds.MeasuredValueSequence = Sequence([mv])
    if vt == "TEXT":
        ds.TextValue = str(kw.pop("text"))
    if "children" in kw:
        ds.ContentSequence = Sequence(kw.pop("children"))  # type: ignore[arg-type]
    return ds


def _group(*children: Dataset) -> Dataset:
    return _item("CONTAINER", "Measurement Group", children=list(children))


def _sr(*groups: Dataset, extra: list[Dataset] | None = None) -> Dataset:
    sr = Dataset()
    sr.ContentSequence = Sequence([_item("CONTAINER", "Imaging Measurements", children=list(groups))] + (extra or []))
    return sr


def _wrist_groups() -> list[Dataset]:
    site = _item("CODE", "Finding Site", code="Wrist", children=[_item("CODE", "Laterality", code="Right")])
    study = _group(_item("CODE", "Finding", code="Fracture"), site, _item("NUM", "Fracture", value=0.83,
                   unit="{probability}"), _item("CODE", "Fracture", code="Present"))
    image = _group(_item("CODE", "Finding", code="Fracture"), site, _item("NUM", "Fracture", value=0.41,
                   unit="{probability}"), _item("CODE", "Fracture", code="Absent"), _item("IMAGE", "Source"))
    return [study, image]


def test_finding_is_the_study_level_conclusion_with_measured_image_findings() -> None:
    assert finding_text(_sr(*_wrist_groups())) == "Wrist (right) fracture: Present, p=0.83"
    vertebra = _group(_item("CODE", "Finding", code="Osteoporosis"), _item("CODE", "Finding Site", code="L1 vertebra"),
                      _item("NUM", "Finding", value=0.91, unit="{probability}"),
                      _item("NUM", "Attenuation Coefficient", value=66.5, unit="[hnsf'U]"), _item("IMAGE", "Source"))
    patient = _group(_item("CODE", "Finding", code="Osteoporosis"), _item("CODE", "Finding Site", code="Lumbar spine"))
    assert finding_text(_sr(patient, vertebra)) == "Lumbar spine: Osteoporosis; L1 vertebra: Osteoporosis, p=0.91, 66 HU"
    femur = _group(_item("CODE", "Finding", code="Femur"), _item("NUM", "Volume", value=144000.0, unit="mm3"))
    assert finding_text(_sr(femur)) == "Femur 144 mL"


def test_a_summary_statement_in_the_sr_wins() -> None:
    statement = "p=0.83 >= 0.50: fracture suspected (study p is the highest of 2 images)"
    sr = _sr(*_wrist_groups(), extra=[_item("TEXT", "Finding summary", text=statement)])
    assert finding_text(sr) == statement


def test_table_wraps_the_whole_finding_and_truth() -> None:
    words = [f"L{i} vertebra: Osteoporosis, p=0.9{i}, {60 + i} HU" for i in range(1, 9)]
    row = StudyRow(uid="1.2.3", task="spine_bmd", accession="A123456789", patient="Moreau, Hugo (M, 24 y)",
                   latency="12.3s", finding="; ".join(words), truth="osteoporosis (lowest of L1-L4); " * 4)
    text = table([row], width=110)
    lines = text.splitlines()
    assert all(len(line) <= 110 for line in lines)
    assert lines[2].startswith("A123456789 ") and lines[3].startswith("Moreau, Hugo (M, 24 y)")
    start = lines[0].index("AI finding")
    end = lines[0].index("synthetic truth")
    unwrapped = " ".join(line[start:end].strip() for line in lines[2:])
    assert " ".join(unwrapped.split()) == "; ".join(words)  # nothing cut
    assert "..." not in text


def test_patient_alias_truth_and_links(tmp_path: Path) -> None:
    ds = Dataset()
    ds.PatientName, ds.PatientSex, ds.PatientAge = "MOREAU^HUGO", "M", "024Y"
    assert patient_alias(ds) == "Moreau, Hugo (M, 24 y)"
    (tmp_path / "labels.jsonl").write_text(
        '{"study_uid": "1.2", "grade_true": 4, "site": "tibia", "label": 4}\n', encoding="utf-8")
    assert synthetic_truth("hrpqct_motion", tmp_path) == {"1.2": "tibia motion grade 4 (>= 4: rescan)"}
    row = StudyRow(uid="1.2", task="hrpqct_motion", accession="A1", patient="x", finding="f", truth="t",
                   explorer_url="http://127.0.0.1:1/app/explorer.html#study?uuid=ab",
                   viewer_url="http://127.0.0.1:2/viewer?StudyInstanceUIDs=1.2")
    index, txt = write_links(tmp_path, [row], "http://127.0.0.1:1", "http://127.0.0.1:2", "")
    assert 'href="http://127.0.0.1:2/viewer?StudyInstanceUIDs=1.2"' in index.read_text()
    assert "OHIF viewer: http://127.0.0.1:2" in txt.read_text()
    row.viewer_url = ""
    index, txt = write_links(tmp_path, [row], "http://127.0.0.1:1", None, "no OHIF here")
    assert "StudyInstanceUIDs" not in index.read_text() and "not available (no OHIF here)" in txt.read_text()
