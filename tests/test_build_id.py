"""Stale builds are refused: every compiled module carries the build id (a hash of the C++ sources,
computed by CMakeLists.txt), and so does the generated gmattn/_build_info.py; gmattn._ext refuses a
module from another build and, when the package runs from a source checkout, sources edited since
the build."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gmattn
from gmattn import _build_info, _ext

REPO = Path(__file__).resolve().parents[1]
LOAD_CORE = "import gmattn._ext as e; e.core(); print('loaded')"


def test_modules_carry_the_build_id_of_their_sources():
    assert len(_build_info.BUILD_ID) == 64 and int(_build_info.BUILD_ID, 16) >= 0
    assert _ext.core().__build_id__ == _build_info.BUILD_ID
    # The id is the hash of the per-file hashes the build recorded (the same formula as CMakeLists.txt).
    manifest = "".join(f"{path} {digest}\n" for path, digest in sorted(_build_info.SOURCES.items()))
    assert hashlib.sha256(manifest.encode()).hexdigest() == _build_info.BUILD_ID
    assert "cpp/cpu/forward.cpp" in _build_info.SOURCES and "cpp/bindings/module.cpp" in _build_info.SOURCES
    assert not any(path.startswith("cpp/cuda/emulation/") for path in _build_info.SOURCES)


def test_the_installed_build_is_of_this_checkouts_sources():
    """Run from the checkout that was installed (as CI does), every hashed file is unchanged."""
    if not (REPO / "CMakeLists.txt").is_file():
        pytest.skip("the tests do not run from a source checkout")
    changed = [path for path, digest in _build_info.SOURCES.items()
               if not (REPO / path).is_file() or hashlib.sha256((REPO / path).read_bytes()).hexdigest() != digest]
    assert not changed, f"the installed gmattn was built from other sources; reinstall ({changed})"


def _package_copy(root: Path) -> Path:
    """A copy of the installed package (Python files, compiled modules, _build_info.py) at root/python/gmattn."""
    target = root / "python" / "gmattn"
    shutil.copytree(Path(gmattn.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _load_core(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD_CORE], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root / "python"), "PATH": "/usr/bin:/bin"})


def test_a_module_from_another_build_is_refused(tmp_path):
    package = _package_copy(tmp_path)
    assert "loaded" in _load_core(tmp_path).stdout  # the copy as installed loads
    info = package / "_build_info.py"
    info.write_text(info.read_text().replace(_build_info.BUILD_ID, "0" * 64))
    result = _load_core(tmp_path)
    assert result.returncode != 0
    assert "the build is stale: the compiled module 'gmattn._core' has build id " + _build_info.BUILD_ID in result.stderr
    assert "pip install" in result.stderr


def test_a_package_without_build_info_is_refused(tmp_path):
    (_package_copy(tmp_path) / "_build_info.py").unlink()
    result = _load_core(tmp_path)
    assert result.returncode != 0 and "_build_info.py, which the build writes" in result.stderr


def test_sources_edited_since_the_build_are_refused_in_a_checkout(tmp_path):
    """python/gmattn inside a source checkout (PYTHONPATH=python, an editable install): a C++ file
    edited after the build makes the compiled module stale, and the message names the file."""
    _package_copy(tmp_path)
    for path, digest in _build_info.SOURCES.items():
        source = REPO / path
        if not source.is_file() or hashlib.sha256(source.read_bytes()).hexdigest() != digest:
            pytest.skip("this checkout is not the installed build's sources")
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp_path / path)
    assert "loaded" in _load_core(tmp_path).stdout  # unchanged sources: the build is current
    with open(tmp_path / "cpp" / "cpu" / "forward.cpp", "a") as f:
        f.write("\n// edited after the build\n")
    result = _load_core(tmp_path)
    assert result.returncode != 0
    assert f"these sources in {tmp_path} changed since the build: cpp/cpu/forward.cpp" in result.stderr
