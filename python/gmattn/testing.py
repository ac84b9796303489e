"""Helpers for testing code that uses gmattn."""

from __future__ import annotations

import contextlib
import os

from . import _config

UNDER_ADDRESS_SANITIZER = "libasan" in os.environ.get("LD_PRELOAD", "")
"""True when AddressSanitizer is preloaded (tools/sanitize.sh): its quarantine keeps freed memory
resident and its shadow memory needs more address space than a tight RLIMIT_AS leaves, so tests
that measure memory skip themselves."""


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
