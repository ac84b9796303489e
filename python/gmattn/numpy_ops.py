"""NumPy front end: forward pass of the compiled CPU core on NumPy arrays (no autograd).

`host_forward` and `host_backward` run the core on NumPy arrays; the MLX front end calls them
too, on NumPy views of its arrays.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import _checks, _config, _ext
_checks.NATIVE_ARRAY_TYPES["numpy"] = np.ndarray
_checks.KNOWN_DTYPE_NAMES.update({np.dtype(name): name for name in ("float16", "float32", "float64", "bool", "uint8",
                                                                    "int32", "int64")})


def _empty(shape, dtype) -> np.ndarray:
    if not _config.poison_outputs:  # (without new_output's keyword call: a step's Python is counted in us)
        return np.empty(shape, dtype)
    return _config.new_output(np.empty, np.full, shape, dtype=dtype)


def host_forward(q, k, v, mu, omega, alpha, mask, S0, z0, *, causal, eps, sigma_eps, return_state, save,
                 num_threads, cu_seqlens=None, state_in_place=False):
    """Runs the core's forward on NumPy arrays; returns (out, S_final, z_final, gq, gk, den), None
    for an output not requested. mu, omega, alpha, S0 and z0 are already in the accumulator dtype;
    cu_seqlens (packed sequences), if given, is int64. With state_in_place the final state is
    written into S0 and z0, which are returned as S_final and z_final."""
    shapes = _checks.forward_output_shapes(q, v, mu, return_state and not state_in_place, save, cu_seqlens)
    dtypes = (q.dtype,) + (mu.dtype,) * 5
    outputs = tuple(None if shape is None else _empty(shape, dtype) for shape, dtype in zip(shapes, dtypes))
    # (every argument by position: pybind11 matches keywords string by string, at a cost next to a
    # one-token call's kernel)
    _ext.core().forward(q, k, v, mu, omega, alpha, mask, S0, z0, *outputs, causal, eps, sigma_eps, num_threads, 0,
                        None, cu_seqlens, state_in_place)
    if state_in_place:
        outputs = (outputs[0], S0, z0) + outputs[3:]
    return outputs


def host_backward(q, k, v, mu, omega, alpha, mask, S0, z0, out, gq, gk, den, dout, dS_final, dz_final, *,
                  causal, eps, sigma_eps, num_threads, S_end=None, z_end=None, cu_seqlens=None):
    """Runs the core's backward on NumPy arrays; returns (dq, dk, dv, dmu, domega, dalpha, dS0, dz0).
    S_end, z_end (bidirectional, optional): the forward's final state, which the core then does not
    sum again."""
    acc = mu.dtype
    dq, dk, dv = _empty(q.shape, q.dtype), _empty(k.shape, k.dtype), _empty(v.shape, v.dtype)
    dmu, domega, dalpha = _empty(mu.shape, acc), _empty(omega.shape, acc), _empty(alpha.shape, acc)
    dS0 = _empty(S0.shape, acc) if S0 is not None else None
    dz0 = _empty(z0.shape, acc) if z0 is not None else None
    _ext.core().backward(
        q, k, v, mu, omega, alpha, mask, S0, z0, out, gq, gk, den, dout, dS_final, dz_final,
        dq, dk, dv, dmu, domega, dalpha, dS0, dz0, causal, eps, sigma_eps, num_threads, 0, True, S_end, z_end, None,
        cu_seqlens,
    )  # (by position, see host_forward; True: deterministic)
    return dq, dk, dv, dmu, domega, dalpha, dS0, dz0


def _step_call(q, k, v, mu, omega, alpha, initial_state, causal, output_final_state, eps, sigma_eps, num_threads,
               state_in_place):
    """The call through the core's plain entry (`step`: no DLPack export, positional arguments,
    no Python checks) when its arguments plainly fit it (_checks.plain_step_dims): NumPy arrays (no
    subclass), no mask, no packed sequences. The core runs every check of its forward and, when one
    would fail, runs nothing and says so; then, as for anything else outside the pattern, the
    result is None and the general path runs, and its checks name the problem with their usual
    messages. Returns gma_attention's result otherwise."""
    ndarray = np.ndarray
    if initial_state is None:
        if state_in_place:
            return None
        S0 = z0 = None
    elif type(initial_state) in (tuple, list) and len(initial_state) == 2:
        S0, z0 = initial_state
        if type(S0) is not ndarray or type(z0) is not ndarray:
            return None
    else:
        return None
    if not (type(q) is ndarray and type(k) is ndarray and type(v) is ndarray and type(mu) is ndarray
            and type(omega) is ndarray and type(alpha) is ndarray and type(num_threads) is int):
        return None
    dims = _checks.plain_step_dims(q, k, v, mu, omega, alpha, causal, eps, sigma_eps)
    if dims is None:
        return None
    B, N, H, D, Dv, K = dims
    out = _empty((B, N, H, Dv), q.dtype)
    if state_in_place:
        S_final, z_final = S0, z0
    elif output_final_state:  # (in mu's dtype: the core refuses any other accumulator dtype)
        S_final, z_final = _empty((B, H, K, Dv), mu.dtype), _empty((B, H, K), mu.dtype)
    else:
        S_final = z_final = None
    if not _ext.core().step(q, k, v, mu, omega, alpha, S0, z0, out, S_final, z_final, causal, eps, sigma_eps,
                            num_threads):
        return None
    return (out, (S_final, z_final)) if output_final_state else out


def gma_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mu: np.ndarray,
    omega: np.ndarray,
    alpha: np.ndarray,
    *,
    causal: bool = False,
    key_padding_mask: Optional[np.ndarray] = None,
    initial_state: Optional[Tuple[np.ndarray, np.ndarray]] = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    sigma_eps: float = 1e-4,
    num_threads: int = 0,
    cu_seqlens: Optional[np.ndarray] = None,
    state_in_place: bool = False,
):
    """Gaussian Mixture Attention on NumPy arrays; see gmattn.gma_attention.

    float32 and float64 (NumPy has no bfloat16). `num_threads=0` uses OpenMP's default
    (OMP_NUM_THREADS, else all cores).

    `state_in_place=True` writes the final state into the arrays of `initial_state` (a decoding
    loop's carried state, updated without new arrays per step); they must be writable,
    C-contiguous and of the accumulator dtype (float32, or float64 for float64 inputs), and are
    what `output_final_state=True` then returns.
    """
    if key_padding_mask is None and cu_seqlens is None:
        result = _step_call(q, k, v, mu, omega, alpha, initial_state, causal, output_final_state, eps, sigma_eps,
                            num_threads, state_in_place)
        if result is not None:
            return result
    dims = _checks.check_arguments(q, k, v, mu, omega, alpha, key_padding_mask, initial_state, eps, sigma_eps,
                                   cu_seqlens)
    for name, x in _checks.array_arguments(k, v, mu, omega, alpha, key_padding_mask, initial_state, cu_seqlens):
        _checks.require_framework("gma_attention", f"'{name}'", x, "numpy", "like q; convert with np.asarray")
    acc = np.dtype(dims.accumulator)
    mu, omega, alpha = (np.asarray(p, dtype=acc) for p in (mu, omega, alpha))
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = (np.asarray(s, dtype=acc) for s in initial_state)
    if state_in_place:
        if initial_state is None:
            raise ValueError("gma_attention: state_in_place=True needs an initial_state to update")
        for name, given, used in (("S", initial_state[0], S0), ("z", initial_state[1], z0)):
            if used is not given:  # a converted copy: the update would be lost
                raise ValueError(f"gma_attention: state_in_place=True updates initial_state's arrays, so {name} must "
                                 f"be a NumPy array of the accumulator dtype {acc}, got "
                                 f"{type(given).__name__} of dtype {getattr(given, 'dtype', None)}")
    if cu_seqlens is not None:
        cu_seqlens = np.asarray(cu_seqlens, dtype=np.int64)
    out, S_final, z_final, _, _, _ = host_forward(
        q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, causal=bool(causal), eps=float(eps),
        sigma_eps=float(sigma_eps), return_state=bool(output_final_state), save=False, num_threads=int(num_threads),
        cu_seqlens=cu_seqlens, state_in_place=bool(state_in_place),
    )
    if output_final_state:
        return out, (S_final, z_final)
    return out
