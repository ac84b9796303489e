"""Process-wide switches of the Python front ends (never read by the compiled core)."""

from __future__ import annotations

from typing import Any, Callable

# When True, front ends allocate kernel outputs filled with NaN instead of uninitialised memory,
# so a test sees any element a kernel forgot to write. Set through gmattn.testing.poisoned_outputs.
poison_outputs = False


def new_output(empty: Callable[..., Any], full: Callable[..., Any], shape, **kwargs) -> Any:
    """A kernel output buffer: `empty(shape, **kwargs)`, or NaN-filled while `poison_outputs` is set.

    `empty` and `full` are the array library's own (np.empty / np.full, torch.empty / torch.full),
    so every front end shares this switch while this module imports no framework.
    """
    if poison_outputs:
        return full(shape, float("nan"), **kwargs)
    return empty(shape, **kwargs)
