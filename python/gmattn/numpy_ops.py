"""NumPy front end: forward pass of the compiled CPU core on NumPy arrays (no autograd)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import _checks, _config, _ext


def _empty(shape, dtype) -> np.ndarray:
    if _config.poison_outputs:
        return np.full(shape, np.nan, dtype=dtype)
    return np.empty(shape, dtype=dtype)


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
):
    """Gaussian Mixture Attention on NumPy arrays; see gmattn.gma_attention.

    float32 and float64 (NumPy has no bfloat16). `num_threads=0` uses OpenMP's default
    (OMP_NUM_THREADS, else all cores).
    """
    dims = _checks.check_arguments(q, k, v, mu, omega, alpha, key_padding_mask, initial_state, eps, sigma_eps)
    acc = np.dtype(dims.accumulator)
    mu, omega, alpha = (np.asarray(p, dtype=acc) for p in (mu, omega, alpha))
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = (np.asarray(s, dtype=acc) for s in initial_state)
    B, N, H, K, Dv = dims.B, dims.N, dims.H, dims.K, dims.Dv
    out = _empty((B, N, H, Dv), q.dtype)
    S_final = _empty((B, H, K, Dv), acc) if output_final_state else None
    z_final = _empty((B, H, K), acc) if output_final_state else None
    _ext.core().forward(
        q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, out, S_final, z_final, None, None, None,
        causal=bool(causal), eps=float(eps), sigma_eps=float(sigma_eps), num_threads=int(num_threads), stream=0,
    )
    if output_final_state:
        return out, (S_final, z_final)
    return out
