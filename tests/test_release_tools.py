"""The release tools: tools/build_wheels.sh and tools/repair_wheel.sh refuse bad arguments before
doing any work, the cibuildwheel table in pyproject.toml is well formed (and accepted by
cibuildwheel itself where it is installed), and tools/wheel_smoke.py passes on the installed
package. The full wheel build (minutes) runs only with GMATTN_TEST_WHEEL_BUILD=1."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "tools" / "build_wheels.sh"
REPAIR = REPO / "tools" / "repair_wheel.sh"
SMOKE = REPO / "tools" / "wheel_smoke.py"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the release tools are bash scripts")


def _run(cmd, timeout=120, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.parametrize("script", [BUILD, REPAIR], ids=["build_wheels", "repair_wheel"])
def test_help(script):
    res = _run(["bash", script, "--help"])
    assert res.returncode == 0 and res.stdout.startswith("usage: tools/"), res.stdout + res.stderr
    assert "--openmp" in res.stdout and "shared" in res.stdout and "private" in res.stdout


BUILD_ERRORS = [
    ([], {}, "OUTDIR is required"),
    (["a", "b"], {}, "one OUTDIR expected, got 'a' and 'b'"),
    (["--openmp", "twice", "out"], {}, "--openmp must be 'shared' or 'private', got 'twice'"),
    (["--openmp"], {}, "--openmp needs a value"),
    (["--python"], {}, "--python needs a value"),
    (["--frobnicate", "out"], {}, "unknown option '--frobnicate'"),
    (["out"], {"GMATTN_CUDA": "maybe"}, "GMATTN_CUDA must be AUTO, ON or OFF, got 'maybe'"),
    (["--python", "no-such-python-3", "out"], {}, "no Python 'no-such-python-3' on PATH"),
]


@pytest.mark.parametrize("args,env,message", BUILD_ERRORS, ids=[e[2][:30] for e in BUILD_ERRORS])
def test_build_wheels_refuses_bad_arguments(args, env, message, tmp_path):
    res = _run(["bash", BUILD] + args, cwd=tmp_path, env=dict(os.environ, **env))
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr, res.stderr
    assert not (tmp_path / "out").exists(), "work started before the arguments were checked"


REPAIR_ERRORS = [
    ([], "-w DEST_DIR and WHEEL are required"),
    (["-w", "d"], "-w DEST_DIR and WHEEL are required"),
    (["-w", "d", "a.whl", "b.whl"], "one WHEEL expected"),
    (["--openmp", "none", "-w", "d", "a.whl"], "--openmp must be 'shared' or 'private', got 'none'"),
    (["-w", "d", "missing.whl"], "no such wheel: missing.whl"),
]


@pytest.mark.parametrize("args,message", REPAIR_ERRORS, ids=[e[1][:30] for e in REPAIR_ERRORS])
def test_repair_wheel_refuses_bad_arguments(args, message, tmp_path):
    res = _run(["bash", REPAIR] + args, cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr, res.stdout + res.stderr


# --------------------------------------------------------------------------------------------
# The cibuildwheel table

def _pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


PYTHONS = ["cp39", "cp310", "cp311", "cp312", "cp313"]
EXPECTED = {"linux": {f"{py}-manylinux_{arch}" for py in PYTHONS for arch in ("x86_64", "aarch64")},
            "macos": {f"{py}-macosx_arm64" for py in PYTHONS}}


def test_cibuildwheel_table():
    table = _pyproject()["tool"]["cibuildwheel"]
    assert table["build"].split() == [f"{py}-*" for py in PYTHONS]
    assert table["linux"]["archs"] == ["x86_64", "aarch64"] and table["macos"]["archs"] == ["arm64"]
    assert table["linux"]["environment"]["GMATTN_CUDA"] == "OFF"
    # Every command names files of this repository that exist, with options they accept.
    commands = [table["test-command"], table["linux"]["test-command"], table["macos"]["test-command"],
                table["linux"]["repair-wheel-command"]]
    for command in commands:
        for path in re.findall(r"\{project\}/(\S+)", command):
            assert (REPO / path).is_file(), f"{command!r}: no {path}"
    assert "--require numpy,torch,mlx" in table["macos"]["test-command"]
    assert "--openmp-runtimes 1" in table["linux"]["test-command"]
    assert "--openmp shared" in table["linux"]["repair-wheel-command"]


@pytest.mark.parametrize("platform", ["linux", "macos"])
def test_cibuildwheel_accepts_the_table(platform):
    """cibuildwheel validates every key of the table (an unknown one is an error) and expands the
    build selectors; nothing is built."""
    exe = shutil.which("cibuildwheel") or str(Path(sys.executable).parent / "cibuildwheel")
    if not os.path.exists(exe):
        pytest.skip("cibuildwheel is not installed")
    res = _run([exe, "--print-build-identifiers", "--platform", platform], cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert set(res.stdout.split()) == EXPECTED[platform], res.stdout


# --------------------------------------------------------------------------------------------
# The smoke test and the full build

def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_wheel_smoke_passes_on_installed_package(tmp_path):
    pytest.importorskip("torch")
    require = "numpy,torch" + (",mlx" if _has("mlx") else "")
    cmd = [sys.executable, SMOKE, "--require", require]
    if sys.platform.startswith("linux"):
        cmd += ["--openmp-runtimes", "1"]  # a source build links libgomp.so.1: torch's copy or the system's, one
    res = _run(cmd, cwd=tmp_path, timeout=300)
    assert res.returncode == 0 and "smoke test passed" in res.stdout, res.stdout + res.stderr
    assert "front ends agree: numpy, torch" in res.stdout


def test_wheel_smoke_refuses_missing_framework(tmp_path):
    res = _run([sys.executable, SMOKE, "--require", "numpy,jax"], cwd=tmp_path)
    assert res.returncode == 2 and "unknown framework(s) ['jax']" in res.stderr, res.stderr


@pytest.mark.skipif(os.environ.get("GMATTN_TEST_WHEEL_BUILD") != "1",
                    reason="builds, repairs and installs a wheel (minutes); set GMATTN_TEST_WHEEL_BUILD=1")
def test_build_wheels_end_to_end(tmp_path):
    env = dict(os.environ, GMATTN_CUDA=os.environ.get("GMATTN_CUDA", "OFF"))
    require = "numpy,torch" + (",mlx" if _has("mlx") else "")
    res = _run(["bash", BUILD, "--python", sys.executable, "--require", require, tmp_path / "dist"], env=env,
               timeout=3600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    wheels = list((tmp_path / "dist").glob("gmattn-*manylinux*.whl"))
    assert len(wheels) == 1, wheels
    assert "is consistent with the following platform tag" in res.stdout
    assert "smoke test passed" in res.stdout and "OpenMP runtimes mapped (1)" in res.stdout
