"""Helpers for testing code that uses gmattn."""

from __future__ import annotations

import contextlib

from . import _config


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Allocate every kernel output filled with NaN inside this block.

    A kernel that leaves any element of its outputs unwritten then returns NaN there, which a
    comparison against the reference catches.
    """
    previous = _config.poison_outputs
    _config.poison_outputs = enabled
    try:
        yield
    finally:
        _config.poison_outputs = previous
