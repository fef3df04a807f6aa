"""Orthanc accepts every result object over C-STORE and indexes it in the source study."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from dicomnode.results import ResultContext
from dicomnode.results import codes as rc
from dicomnode.results.builder import build_results
from inference.findings import (
    FRACTURE,
    PRESENT,
    Box,
    Classification,
    Findings,
    ImageRef,
    Mask,
    Overlay,
    Panel,
)
from tests.orthanc import OrthancServer
from tests.unit._results_sources import dx_image, volume_series

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-results")).start()
    try:
        yield server
    finally:
        server.stop()


def _c_store(server: OrthancServer, datasets: list[pydicom.Dataset]) -> list[int]:
    ae = AE(ae_title="BONENODE")
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
    assert assoc.is_established, "Orthanc refused the association"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _knee_and_wrist_results():
    mr = volume_series("MR", n=4, rows=24, cols=20)
    study = str(mr[0].StudyInstanceUID)
    refs = tuple(ImageRef(str(d.SOPInstanceUID)) for d in mr)
    femur = np.zeros((4, 24, 20), bool)
    femur[:3, 3:12, 4:15] = True
    knee = Findings("knee_bone_seg", "KneeUNet", "1.0", study, refs,
                    masks=[Mask(rc.FEMUR, rc.ANATOMICAL_STRUCTURE, femur, refs)],
                    overlays=[Overlay([Panel(image=r, contours={"femur": femur[i]}) for i, r in enumerate(refs)],
                                      "bone contours")])
    dx = dx_image(study_uid=study)
    ref = ImageRef(str(dx.SOPInstanceUID))
    box = Box(ref, 5, 6, 30, 40, FRACTURE, 0.9)
    wrist = Findings("wrist_fracture", "WristNet", "0.3", study, (ref,),
                     classifications=[Classification(FRACTURE, PRESENT, 0.9, finding_site=rc.WRIST)], boxes=[box],
                     overlays=[Overlay([Panel(image=ref, boxes=[box], heatmap=np.ones((4, 4)))], "fracture")])
    return [*mr, dx], build_results(knee, mr, ResultContext()) + build_results(wrist, [dx], ResultContext())


def test_orthanc_indexes_results_in_the_source_study(pacs: OrthancServer, tmp_path: Path, dciodvfy) -> None:
    sources, results = _knee_and_wrist_results()
    assert sorted({str(r.Modality) for r in results}) == ["OT", "SEG", "SR"]
    for i, src in enumerate(sources):
        path = tmp_path / f"src{i}.dcm"
        src.save_as(path, enforce_file_format=True)
        pacs.upload(path)
    for i, ds in enumerate(results):  # every object we send is valid
        path = tmp_path / f"result{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        dciodvfy(path)
    sent = [pydicom.dcmread(tmp_path / f"result{i}.dcm") for i in range(len(results))]
    assert _c_store(pacs, sent) == [0] * len(sent)

    study_uid = str(sources[0].StudyInstanceUID)
    stored = {i["SOPInstanceUID"]: i for i in pacs.instances_in_study(study_uid)}
    for ds in results:
        item = stored[str(ds.SOPInstanceUID)]
        assert item["StudyInstanceUID"] == study_uid
        assert item["SeriesInstanceUID"] == str(ds.SeriesInstanceUID)
        assert item["SeriesDescription"] == str(ds.SeriesDescription)
    assert len(stored) == len(sources) + len(results)
    assert pacs.statistics()["CountStudies"] >= 1
    assert len(pacs.find("Study", {"StudyInstanceUID": study_uid})) == 1
    # Orthanc kept the non-ASCII patient name it got from the copied character set
    tags = pacs.get(f"/instances/{stored[str(results[1].SOPInstanceUID)]['ID']}/simplified-tags")
    assert tags["PatientName"] == "Müller^Jörg"
