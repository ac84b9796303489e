"""Loading of the compiled modules. A missing or broken build fails loudly, with the fix."""

from __future__ import annotations

import importlib

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
    from . import __version__

    built = getattr(module, "__version__", None)
    if built != __version__:
        raise ImportError(
            f"gmattn: the compiled module 'gmattn.{name}' is version {built}, but the Python package "
            f"is {__version__}: the build is stale. " + _REBUILD
        )
    _cache[name] = module
    return module


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
