"""The shipped deploy/ files with real programs: Orthanc runs deploy/orthanc.json (ports, folders and the node's
address swapped for the test) with deploy/autoroute.lua, and a study uploaded to Orthanc reaches the node by
auto-routing alone; its results come back once and are not routed again. The container config validates.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from dicomnode.config import load_config
from tests.integration.conftest import REPO_ROOT, NodeProcess, wait_for
from tests.orthanc import ORTHANC_BIN, OrthancServer
from tests.plugins.bone_test_task import write_study

pytestmark = pytest.mark.integration

DEPLOY = REPO_ROOT / "deploy"


class DeployedOrthanc(OrthancServer):
    """Orthanc started from deploy/orthanc.json; only site-specific values are replaced."""

    def write_config(self) -> None:
        cfg = json.loads((DEPLOY / "orthanc.json").read_text(encoding="utf-8"))
        lua = self.workdir / "autoroute.lua"
        shutil.copy(DEPLOY / "autoroute.lua", lua)
        (ae, host, port), = self.modalities.values()
        cfg["DicomModalities"]["bonenode"].update(AET=ae, Host=host, Port=port)
        cfg.update(StorageDirectory=str(self.workdir / "storage"), IndexDirectory=str(self.workdir / "index"),
                   DicomPort=self.dicom_port, HttpPort=self.http_port, DicomAet=self.aet, RemoteAccessAllowed=False,
                   AuthenticationEnabled=False, StableAge=1, LuaScripts=[str(lua)])
        self.config_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def test_autoroute_lua_sends_stable_series_once(tmp_path: Path) -> None:
    if not Path(ORTHANC_BIN).exists():
        pytest.skip(f"Orthanc binary not found at {ORTHANC_BIN}")
    pacs = DeployedOrthanc(tmp_path / "orthanc", aet="ORTHANC")
    node = NodeProcess(tmp_path / "node", pacs.dicom_port)
    pacs.modalities["bonenode"] = ("BONENODE", "127.0.0.1", node.port)
    node.start()
    pacs.start()
    try:
        study_uid, paths = write_study(tmp_path / "study", n_series=1, n_images=2)
        source = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
        pacs.upload_dir(tmp_path / "study")  # no manual send: the Lua script routes the stable series

        def results() -> list[dict]:
            found = [i for i in pacs.instances_in_study(study_uid) if i["SOPInstanceUID"] not in source]
            return found if len(found) >= 2 else []

        got = wait_for(results, 120, "auto-routed study's results in Orthanc")
        assert sorted(r["Modality"] for r in got) == ["OT", "SR"]
        time.sleep(4)  # the results' series became stable too; they must not go back to the node
        assert len(node.query("SELECT 1 FROM instances")) == len(source)
        assert [j["state"] for j in node.query("SELECT state FROM jobs")] == ["done"]
        assert len(pacs.instances_in_study(study_uid)) == len(source) + 2
        assert "autoroute: sending series" in pacs.log_tail(10**6)
    finally:
        node.stop()
        pacs.stop()


def test_container_config_validates(tmp_path: Path) -> None:
    cfg = load_config(DEPLOY / "node.container.yaml")
    assert cfg.node.status_http_port == 8080 and {r.task for r in cfg.routes} == {
        "wrist_fracture", "physis_fracture", "spine_bmd", "hrpqct_motion", "knee_bone_seg"}
    # the image copies models/ to /opt/dicomnode/models: check against the same bundles here
    local = tmp_path / "node.yaml"
    local.write_text((DEPLOY / "node.container.yaml").read_text().replace(
        "models_dir: /opt/dicomnode/models", f"models_dir: {REPO_ROOT / 'models'}"))
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "check-config", str(local)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_parse(tmp_path: Path) -> None:
    for unit in ("dicomnode.service", "dicomnode-train.service"):
        out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(DEPLOY / unit)], capture_output=True,
                             text=True, timeout=60)
        problems = [line for line in out.stderr.splitlines()
                    if unit in line and "Command " not in line and "not executable" not in line
                    and "No such file" not in line and "Failed to resolve user" not in line
                    and "Failed to resolve group" not in line]
        assert not problems, out.stderr
