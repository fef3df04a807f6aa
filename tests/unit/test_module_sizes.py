"""Size limits of issue #36 (functions <= 60 lines, modules <= 500) held by all the project's code.

The checker is ``scripts/check_sizes.py``; these tests run it on every folder it checks by default
(dicomnode/, inference/, training/, scripts/, benchmarks/), and on small files made here to show that it
catches what it should (and nothing else).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_sizes.py"


def _checker() -> ModuleType:
    """``scripts/check_sizes.py`` as a module (scripts/ is not a package)."""
    if "check_sizes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("check_sizes", SCRIPT)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["check_sizes"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["check_sizes"]


def _function(name: str, n_lines: int, indent: str = "") -> str:
    """Source of a function spanning exactly ``n_lines`` lines (def line included)."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(n_lines - 2))
    return f"{indent}def {name}() -> int:\n{body}{indent}    return 0\n"


def test_all_code_folders_hold_the_limits() -> None:
    chk = _checker()
    folders = [ROOT / name for name in ("dicomnode", "inference", "training", "scripts", "benchmarks")]
    assert set(chk.DEFAULT_FOLDERS) == {f.name for f in folders}, "a folder the checker covers is left out here"
    assert all(f.is_dir() for f in folders)
    found = chk.check_folders(folders, root=ROOT)
    assert not found, "over the size limits (split along a seam):\n" + _checker().format_table(found)


def test_checker_flags_long_functions_methods_and_modules(tmp_path: Path) -> None:
    chk = _checker()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "ok.py").write_text(_function("fits", 60))
    (pkg / "long.py").write_text(
        _function("too_long", 61)
        + "\n\nclass Holder:\n" + "    @staticmethod\n" + _function("method", 60, indent="    ")
    )
    (pkg / "big.py").write_text("x = 1\n" * 501)
    found = {(o.path, o.name, o.lines) for o in chk.check_folders([pkg], root=tmp_path)}
    # the decorator line counts: the 60-line method becomes 61
    assert found == {("pkg/long.py", "too_long", 61), ("pkg/long.py", "Holder.method", 61),
                     ("pkg/big.py", "<module>", 501)}


def test_script_exit_status_and_table(tmp_path: Path) -> None:
    (tmp_path / "clean.py").write_text(_function("fits", 60))
    (tmp_path / "dirty.py").write_text(_function("outer", 10) + "\n\n" + _function("nested_host", 70))
    clean = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "clean.py")],
                           capture_output=True, text=True, cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.startswith("OK:")
    dirty = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                           cwd=tmp_path)
    assert dirty.returncode == 1, dirty.stdout + dirty.stderr
    assert "dirty.py::nested_host" in dirty.stdout and "1 over the limit" in dirty.stdout
    missing = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope")], capture_output=True,
                             text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
