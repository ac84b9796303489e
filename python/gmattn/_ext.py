"""Loading of the compiled modules. A missing or broken build fails loudly, with the fix."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Optional

_REBUILD = (
    "Rebuild it from the source checkout with:\n"
    "    python -m pip install --no-build-isolation -v .   (or: python -m pip install -v .)\n"
    "A C++17 compiler with OpenMP and CMake >= 3.18 are needed; "
    "set GMATTN_CUDA=ON to require the CUDA module."
)

_cache: dict[str, object] = {}


def _load(name: str, what: str):
    if name in _cache:
        return _cache[name]
    try:
        module = importlib.import_module(f"gmattn.{name}")
    except ImportError as exc:  # not built, or built for another Python / platform
        raise ImportError(
            f"gmattn: the compiled {what} module 'gmattn.{name}' could not be imported ({exc}). "
            + _REBUILD
        ) from exc
    problem = stale_build_reason(name, getattr(module, "__build_id__", None))
    if problem:
        raise ImportError(f"gmattn: the build is stale: {problem}. " + _REBUILD)
    _cache[name] = module
    return module


def source_checkout() -> Optional[Path]:
    """The source checkout this package runs from (python/gmattn inside it: an editable install or
    PYTHONPATH=python), else None (an installed package)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "CMakeLists.txt").is_file() and (root / "cpp").is_dir() else None


def stale_build_reason(name: str, module_build_id: Optional[str]) -> Optional[str]:
    """Why the compiled module `name` with this build id does not belong to this package, or None.

    Each build writes the hash of the C++ sources into the modules and into gmattn/_build_info.py.
    A module from another build (or one older than build ids) differs from _build_info.BUILD_ID; in
    a source checkout, sources edited since the build differ from it too.
    """
    try:
        from . import _build_info
    except ImportError:
        return ("gmattn/_build_info.py, which the build writes next to the compiled modules, is missing "
                "(this package was not installed by its build)")
    if module_build_id != _build_info.BUILD_ID:
        return (f"the compiled module 'gmattn.{name}' has build id {module_build_id}, but the package was "
                f"installed by build {_build_info.BUILD_ID}")
    root = source_checkout()
    if root is not None:
        changed = [path for path, digest in _build_info.SOURCES.items() if _file_digest(root / path) != digest]
        if changed:
            return f"these sources in {root} changed since the build: {', '.join(changed)}"
    return None


def _file_digest(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def core():
    """The CPU module `gmattn._core` (always built)."""
    return _load("_core", "CPU")


def cuda():
    """The CUDA module `gmattn._cuda`, loaded only when a CUDA tensor arrives."""
    try:
        return _load("_cuda", "CUDA")
    except ImportError as exc:
        raise ImportError(
            str(exc)
            + "\nThe CUDA module is built only where CMake finds nvcc (GMATTN_CUDA=AUTO) or when "
            "GMATTN_CUDA=ON is set at install time."
        ) from exc
