"""The package builds as a wheel and an sdist; the wheel installs into a fresh virtual
environment with no compiler and works there; the extension links no libtorch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs CMake to build")


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("scikit_build_core")
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # The CUDA module is not needed to check packaging; building it would only cost minutes.
    env = dict(os.environ, GMATTN_CUDA="OFF")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(REPO)], env=env,
         timeout=600)
    sdist = next(out.glob("gmattn-*.tar.gz"))
    # The wheel is built from the sdist: this proves the sdist carries everything the build needs.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(sdist)],
         env=env, timeout=900)
    wheel = next(out.glob("gmattn-*.whl"))
    return sdist, wheel


def test_wheel_contents(built):
    _, wheel = built
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("gmattn/_core") and n.endswith(".so") for n in names), names
    assert "gmattn/__init__.py" in names and "gmattn/torch/ops.py" in names
    assert not any("/tests/" in n or n.startswith("cpp/") for n in names), "sources leaked into the wheel"


def test_extension_in_wheel_links_no_torch(built, tmp_path):
    _, wheel = built
    zipfile.ZipFile(wheel).extractall(tmp_path)
    so = next((tmp_path / "gmattn").glob("_core*.so"))
    if shutil.which("readelf") is None:
        pytest.skip("readelf unavailable")
    needed = [line for line in _run(["readelf", "-d", str(so)]).stdout.splitlines() if "(NEEDED)" in line]
    text = "\n".join(needed)
    assert "libtorch" not in text and "libc10" not in text and "libmlx" not in text, text


def test_wheel_installs_and_runs_in_fresh_venv_without_compiler(built, tmp_path):
    _, wheel = built
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false", PATH=f"{env_dir / 'bin'}:/usr/bin:/bin")
    env.pop("PYTHONPATH", None)
    _run([str(py), "-m", "pip", "install", "-q", str(wheel), "numpy"], env=env, timeout=600)
    smoke = (
        "import numpy as np, gmattn\n"
        "rng = np.random.default_rng(0)\n"
        "q = rng.standard_normal((2, 50, 2, 4)).astype(np.float32)\n"
        "v = rng.standard_normal((2, 50, 2, 3)).astype(np.float32)\n"
        "mu = rng.standard_normal((2, 5, 4)).astype(np.float32)\n"
        "out, (S, z) = gmattn.gma_attention(q, q, v, mu, mu, np.zeros((2, 5), np.float32), causal=True,\n"
        "                                   output_final_state=True)\n"
        "assert out.shape == (2, 50, 2, 3) and np.isfinite(out).all() and S.shape == (2, 2, 5, 3)\n"
        "try:\n"
        "    import gmattn.torch\n"
        "    raise SystemExit('torch should be missing in this venv')\n"
        "except ImportError as e:\n"
        "    assert 'needs PyTorch' in str(e), e\n"
        "print('smoke ok', gmattn.__file__)\n"
    )
    res = _run([str(py), "-c", smoke], env=env, cwd=tmp_path, timeout=300)
    assert "smoke ok" in res.stdout and str(env_dir) in res.stdout
