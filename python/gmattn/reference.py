"""Pure-PyTorch references for Gaussian Mixture Attention (GMA).

Everything here is plain, autograd-differentiable PyTorch; nothing imports the compiled
extension. Layout follows docs/design.md section 2:

    q, k  (B, N, H, D)     v (B, N, H, Dv)     mu, omega (H, K, D)     alpha (H, K)
    key_padding_mask (B, N) bool, True = real token
    state (S, z): S (B, H, K, Dv), z (B, H, K)

Four public functions:

* :func:`responsibilities` -- gamma = softmax_k of the Gaussian log-densities, direct
  ``(x - mu)^2`` form (accurate).
* :func:`naive_gma` -- the float64 judge. Builds the N x N affinity ``Gq Gk^T`` explicitly,
  so use it only for small N. Computes in the dtype it is given.
* :func:`packed_gma` -- packed sequences (``cu_seqlens``): :func:`naive_gma` on each sequence
  in turn, the judge for the packed kernels.
* :func:`chunked_gma` -- the same math the way the best plain-PyTorch implementation would
  compute it (the speed baseline for the compiled kernels): responsibilities through the
  expanded quadratic form as batched matmuls, bidirectional as ``Gq (Gk^T V)``, causal as
  chunked linear attention with all chunks batched and the inter-chunk states built by a
  prefix sum over chunks (a two-level triangular-matmul scan). No Python loop over chunks,
  nothing O(N^2).

CPU speed note: plain-PyTorch timings on CPU are dominated by page faults unless the
allocator reuses memory (glibc returns every block above the mmap threshold to the OS);
benchmark with e.g. ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` or jemalloc, for
this baseline and the compiled op alike.

The state ``(S, z)`` is returned in float32 (float64 for float64 inputs) whatever the input
dtype, as in docs/design.md section 1.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["responsibilities", "naive_gma", "packed_gma", "chunked_gma"]

State = Tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------

def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_params(mu, omega, alpha, H: Optional[int], D: Optional[int]) -> Tuple[int, int]:
    for name, t in (("mu", mu), ("omega", omega), ("alpha", alpha)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if mu.dim() != 3:
        raise ValueError(f"mu must have shape (H, K, D) (rank 3), got shape {_shape(mu)}")
    Hm, K, Dm = mu.shape
    if tuple(omega.shape) != tuple(mu.shape):
        raise ValueError(
            f"omega must have the same shape as mu (H, K, D) = {_shape(mu)}, got {_shape(omega)}")
    if alpha.dim() != 2 or tuple(alpha.shape) != (Hm, K):
        raise ValueError(f"alpha must have shape (H, K) = ({Hm}, {K}), got {_shape(alpha)}")
    if K == 0:
        raise ValueError("mu must have at least one mixture component (K >= 1), got K = 0")
    if H is not None and Hm != H:
        raise ValueError(f"mu has H = {Hm} heads but the inputs have H = {H} (shape (H, K, D))")
    if D is not None and Dm != D:
        raise ValueError(f"mu has D = {Dm} but q/k have D = {D} (mu shape (H, K, D))")
    return K, Dm


def _check_shapes(q, k, v, mu, omega, alpha, key_padding_mask, initial_state):
    """Validate ranks, shapes and dtypes; return (B, N, H, D, Dv, K)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            dims = "(B, N, H, Dv)" if name == "v" else "(B, N, H, D)"
            raise ValueError(f"{name} must have shape {dims} (rank 4), got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    B, N, H, D = q.shape
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have the same shape as q (B, N, H, D) = {_shape(q)}, got {_shape(k)}")
    if tuple(v.shape[:3]) != (B, N, H):
        raise ValueError(
            f"v must have shape (B, N, H, Dv) = ({B}, {N}, {H}, Dv) matching q, got {_shape(v)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if N == 0:
        raise ValueError("q must have at least one token (N >= 1), got N = 0")
    Dv = v.shape[3]
    K, _ = _check_params(mu, omega, alpha, H, D)
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor):
            raise ValueError(f"key_padding_mask must be a torch.Tensor, got {type(m).__name__}")
        if tuple(m.shape) != (B, N):
            raise ValueError(f"key_padding_mask must have shape (B, N) = ({B}, {N}), got {_shape(m)}")
        if m.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"key_padding_mask must be a bool tensor (True = real token), got dtype {m.dtype}")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("initial_state must be a pair (S, z) with S (B, H, K, Dv) and z (B, H, K)")
        S0, z0 = initial_state
        for name, t in (("initial_state[0] (S)", S0), ("initial_state[1] (z)", z0)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point torch.Tensor")
        if tuple(S0.shape) != (B, H, K, Dv):
            raise ValueError(
                f"initial_state[0] (S) must have shape (B, H, K, Dv) = ({B}, {H}, {K}, {Dv}), got {_shape(S0)}")
        if tuple(z0.shape) != (B, H, K):
            raise ValueError(
                f"initial_state[1] (z) must have shape (B, H, K) = ({B}, {H}, {K}), got {_shape(z0)}")
    return B, N, H, D, Dv, K


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mixture(mu, omega, alpha, sigma_eps):
    """sigma2, lam, logpi in the accumulator dtype of the parameters (>= float32)."""
    pd = _state_dtype(torch.promote_types(mu.dtype, omega.dtype))
    mu, omega, alpha = mu.to(pd), omega.to(pd), alpha.to(pd)
    sigma2 = F.softplus(omega) + sigma_eps
    lam = 1.0 / sigma2
    logpi = torch.log_softmax(alpha, dim=-1)
    return mu, sigma2, lam, logpi


# --------------------------------------------------------------------------------------
# responsibilities (direct form)
# --------------------------------------------------------------------------------------

def responsibilities(x: torch.Tensor, mu: torch.Tensor, omega: torch.Tensor, alpha: torch.Tensor,
                     sigma_eps: float = 1e-4) -> torch.Tensor:
    """gamma (B, N, H, K) = softmax_k(s), s[i,k] = logpi[k] - 0.5 sum_d(log sigma2 + lam (x - mu)^2).

    x (B, N, H, D); mu, omega (H, K, D); alpha (H, K). Direct ``(x - mu)^2`` form; materialises
    a (B, N, H, K, D) temporary, so it is meant for reference use. Computes in x's dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor of shape (B, N, H, D) (rank 4), got "
                         f"{_shape(x) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    _check_params(mu, omega, alpha, x.shape[2], x.shape[3])
    mu_, sigma2, lam, logpi = _mixture(mu, omega, alpha, sigma_eps)
    dt = x.dtype
    mu_, sigma2, lam, logpi = mu_.to(dt), sigma2.to(dt), lam.to(dt), logpi.to(dt)
    diff = x.unsqueeze(-2) - mu_                               # (B, N, H, K, D)
    s = logpi - 0.5 * (torch.log(sigma2).sum(-1) + (lam * diff * diff).sum(-1))
    return torch.softmax(s, dim=-1)


# --------------------------------------------------------------------------------------
# naive reference (builds the N x N affinity)
# --------------------------------------------------------------------------------------

def _mask_gk(Gk: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if key_padding_mask is None:
        return Gk
    m = (key_padding_mask != 0).to(Gk.dtype)
    return Gk * m[:, :, None, None]


def naive_gma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mu: torch.Tensor, omega: torch.Tensor, alpha: torch.Tensor, *,
              causal: bool = False,
              key_padding_mask: Optional[torch.Tensor] = None,
              initial_state: Optional[State] = None,
              output_final_state: bool = False,
              eps: float = 1e-6, sigma_eps: float = 1e-4):
    """Naive GMA: builds P = Gq Gk^T (N x N per batch row and head) explicitly.

    out[i] = (Gq[i] S0 + sum_j P[i,j] v[j]) / (Gq[i] . z0 + sum_j P[i,j] + eps), with P
    lower-triangular (j <= i) when ``causal``. Masked keys (mask False) write nothing. Every
    query also sees the initial state (S0, z0), in the bidirectional case too. Final state:
    (S0 + Gk^T V, z0 + Gk^T 1). Computes in the input dtype (use float64 as the judge);
    the returned state is float32 (float64 for float64 inputs).

    Returns out (B, N, H, Dv), or (out, (S, z)) when ``output_final_state``.
    """
    B, N, H, D, Dv, K = _check_shapes(q, k, v, mu, omega, alpha, key_padding_mask, initial_state)
    dt = q.dtype
    Gq = responsibilities(q, mu, omega, alpha, sigma_eps)                      # (B, N, H, K)
    Gk = _mask_gk(responsibilities(k, mu, omega, alpha, sigma_eps), key_padding_mask)
    P = torch.einsum("bihk,bjhk->bhij", Gq, Gk)                                # (B, H, N, N)
    if causal:
        P = torch.tril(P)
    num = torch.einsum("bhij,bjhe->bihe", P, v)                                # (B, N, H, Dv)
    den = P.sum(-1).transpose(1, 2)                                            # (B, N, H)
    Sk = torch.einsum("bjhk,bjhe->bhke", Gk, v)                                # (B, H, K, Dv)
    zk = Gk.sum(1)                                                             # (B, H, K)
    if initial_state is not None:
        S0, z0 = initial_state[0].to(dt), initial_state[1].to(dt)
        num = num + torch.einsum("bihk,bhke->bihe", Gq, S0)
        den = den + torch.einsum("bihk,bhk->bih", Gq, z0)
        Sk = Sk + S0
        zk = zk + z0
    out = num / (den + eps).unsqueeze(-1)
    if output_final_state:
        sd = _state_dtype(dt)
        return out, (Sk.to(sd), zk.to(sd))
    return out


def packed_gma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mu: torch.Tensor, omega: torch.Tensor, alpha: torch.Tensor, cu_seqlens, *,
               causal: bool = False,
               initial_state: Optional[State] = None,
               output_final_state: bool = False,
               eps: float = 1e-6, sigma_eps: float = 1e-4):
    """Packed sequences: q, k, v (1, N, H, .) hold S sequences one after another, sequence s the
    rows ``cu_seqlens[s]:cu_seqlens[s + 1]`` (S + 1 offsets from 0 to N; empty sequences allowed).
    :func:`naive_gma` on each sequence alone, in a loop; ``initial_state`` and the final state
    have S in place of B (an empty sequence's final state is its initial state).

    Returns out (1, N, H, Dv), or (out, (S, z)) when ``output_final_state``.
    """
    offsets = [int(o) for o in cu_seqlens]
    if q.shape[0] != 1 or offsets[0] != 0 or offsets[-1] != q.shape[1] or len(offsets) < 2 or any(
            a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"packed_gma: cu_seqlens must run from 0 to N = {q.shape[1]} without decreasing, for q "
                         f"of B = 1; got {offsets} for q {_shape(q)}")
    H, K, Dv = q.shape[2], mu.shape[1], v.shape[3]
    sd = _state_dtype(q.dtype)
    outs, states = [], []
    for s, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        state = None if initial_state is None else (initial_state[0][s:s + 1], initial_state[1][s:s + 1])
        if hi == lo:  # nothing to read or write: the state passes through
            outs.append(v.new_zeros(1, 0, H, Dv))
            states.append(state if state is not None else (q.new_zeros(1, H, K, Dv, dtype=sd),
                                                          q.new_zeros(1, H, K, dtype=sd)))
            continue
        out, state = naive_gma(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mu, omega, alpha, causal=causal,
                               initial_state=state, output_final_state=True, eps=eps, sigma_eps=sigma_eps)
        outs.append(out)
        states.append(state)
    out = torch.cat(outs, dim=1)
    if output_final_state:
        return out, (torch.cat([st[0].to(sd) for st in states]), torch.cat([st[1].to(sd) for st in states]))
    return out


# --------------------------------------------------------------------------------------
# chunked reference (the plain-PyTorch speed baseline)
# --------------------------------------------------------------------------------------
#
# Internal layout: (H, B, N, .) with the batch of matrices M = H * B. The (B, N, H, D) inputs
# are read through strided views, so q and k are never copied: (B, N, H, D) -> (H, B*N, D) is
# a view whose rows have stride H*D, which bmm takes as a leading dimension directly.

def _fast_responsibilities(x: torch.Tensor, mu, sigma2, lam, logpi) -> torch.Tensor:
    """gamma for x (B, N, H, D) -> (H, B*N, K) through the expanded quadratic form.

    s = c[k] + x @ (lam*mu)^T - 0.5 (x*x) @ lam^T with c = logpi - 0.5 sum(log sigma2 + lam mu^2),
    as two batched matmuls accumulated in place (baddbmm). Cheap, but it subtracts large
    terms when |x| or |mu| is large relative to sigma (catastrophic cancellation), so it is
    less accurate than :func:`responsibilities` for huge |x|; fine for a speed baseline.
    """
    B, N, H, D = x.shape
    dt = x.dtype
    c = logpi - 0.5 * (torch.log(sigma2).sum(-1) + (lam * mu * mu).sum(-1))    # (H, K)
    Wlin = (lam * mu).transpose(-1, -2).to(dt)                                  # (H, D, K)
    Wsq = (-0.5 * lam).transpose(-1, -2).to(dt)                                 # (H, D, K)
    xr = x.reshape(B * N, H, D).transpose(0, 1)                                 # (H, B*N, D) view
    s = torch.baddbmm(c.to(dt).unsqueeze(1), xr, Wlin)
    s = torch.baddbmm(s, xr * xr, Wsq)
    return torch.softmax(s, dim=-1)


def _exclusive_scan(x: torch.Tensor, init: Optional[torch.Tensor], group: int = 16):
    """Exclusive prefix sum over dim 1 of x (M, NC, F), plus init (M, F); also the total.

    torch.cumsum over a non-innermost dim is slow on CPU (and slower still in backward), so
    this is a two-level scan made of matmuls with strictly-lower-triangular ones matrices:
    within groups of ``group`` chunks, then across the group totals.
    Returns (prefix (M, NC, F), total (M, F)) with prefix[:, c] = init + sum_{c' < c} x[:, c'].
    """
    M, NC, Fd = x.shape
    g1 = -(-NC // group)
    if g1 == 1:
        L = torch.tril(x.new_ones(NC, NC), -1)
        P = torch.matmul(L, x)
        tot = P[:, -1] + x[:, -1]
        if init is not None:
            P = P + init.unsqueeze(1)
            tot = tot + init
        return P, tot
    pad = g1 * group - NC
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    xg = x.view(M * g1, group, Fd)
    L2 = torch.tril(x.new_ones(group, group), -1).expand(M * g1, group, group)
    P1 = torch.bmm(L2, xg).view(M, g1, group, Fd)                 # prefix inside each group
    T = P1[:, :, -1] + xg.view(M, g1, group, Fd)[:, :, -1]         # group totals (M, g1, F)
    P2 = torch.matmul(torch.tril(x.new_ones(g1, g1), -1), T)      # prefix over groups
    tot = P2[:, -1] + T[:, -1]
    if init is not None:
        P2 = P2 + init.unsqueeze(1)
        tot = tot + init
    # in place: P1 is a fresh bmm output that bmm's backward does not save
    P = P1.add_(P2.unsqueeze(2)).view(M, g1 * group, Fd)
    if pad:
        P = P[:, :NC]
    return P, tot


def chunked_gma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mu: torch.Tensor, omega: torch.Tensor, alpha: torch.Tensor, *,
                causal: bool = False,
                key_padding_mask: Optional[torch.Tensor] = None,
                initial_state: Optional[State] = None,
                output_final_state: bool = False,
                eps: float = 1e-6, sigma_eps: float = 1e-4,
                chunk_size: int = 64):
    """GMA as fast as plain PyTorch allows; same math and signature as :func:`naive_gma`.

    Works in the input dtype (chunk states are scanned in float32, float64 for float64
    inputs). Bidirectional: ``S = Gk^T V`` read with Gq. Causal: N is split into chunks of
    ``chunk_size`` (tail zero-padded); the intra-chunk ``tril(Gq_c Gk_c^T) V_c`` and the
    inter-chunk read ``Gq_c S_prev`` are batched matmuls over all chunks at once, with
    ``S_prev`` the exclusive prefix sum over chunks of ``Gk_c^T V_c`` (plus S0), computed by
    a two-level triangular-matmul scan. The denominator rides along as an extra all-ones
    column of V. Memory: O(N K) for the responsibilities and O(N K Dv / chunk_size) for the
    chunk states, never O(N^2). The output is returned as a (B, N, H, Dv) view of an
    (H, B, N, Dv) buffer (not contiguous).
    """
    B, N, H, D, Dv, K = _check_shapes(q, k, v, mu, omega, alpha, key_padding_mask, initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dt = q.dtype
    sd = _state_dtype(dt)
    E = Dv + 1
    M = H * B
    mu_, sigma2, lam, logpi = _mixture(mu, omega, alpha, sigma_eps)

    Gq = _fast_responsibilities(q, mu_, sigma2, lam, logpi).view(H, B, N, K)
    Gk = _fast_responsibilities(k, mu_, sigma2, lam, logpi).view(H, B, N, K)
    if key_padding_mask is not None:
        Gk = Gk * (key_padding_mask != 0).to(dt)[None, :, :, None]
    # V in (H, B, N, Dv+1) with an all-ones last column: the last column of every product
    # is the denominator part (z and Gq . z).
    v1 = torch.cat([v.permute(2, 0, 1, 3), v.new_ones(H, B, N, 1)], dim=-1)

    S0 = None                                                                  # (H, B, K, Dv+1)
    if initial_state is not None:
        S0 = torch.cat([initial_state[0].to(sd), initial_state[1].to(sd).unsqueeze(-1)], -1)
        S0 = S0.transpose(0, 1)

    if not causal:
        Sk = torch.matmul(Gk.transpose(-1, -2), v1).to(sd)                     # (H, B, K, Dv+1)
        S_fin = Sk if S0 is None else Sk + S0
        nd = torch.matmul(Gq, S_fin.to(dt))                                    # (H, B, N, Dv+1)
    else:
        C = min(chunk_size, N)
        NC = -(-N // C)
        pad = NC * C - N
        if pad:
            Gq = F.pad(Gq, (0, 0, 0, pad))
            Gk = F.pad(Gk, (0, 0, 0, pad))
            v1 = F.pad(v1, (0, 0, 0, pad))
        Gq_c = Gq.reshape(M * NC, C, K)
        Gk_c = Gk.reshape(M * NC, C, K)
        v_c = v1.reshape(M * NC, C, E)
        # chunk states Gk_c^T V_c and their exclusive prefix over chunks (+ S0)
        Sc = torch.bmm(Gk_c.transpose(1, 2), v_c).view(M, NC, K * E).to(sd)
        init = None if S0 is None else S0.reshape(M, K * E)
        S_prev, S_tot = _exclusive_scan(Sc, init)
        S_fin = S_tot.view(H, B, K, E)
        # inter-chunk read, then the intra-chunk causal part accumulated into it
        inter = torch.bmm(Gq_c, S_prev.to(dt).reshape(M * NC, K, E))
        A = torch.bmm(Gq_c, Gk_c.transpose(1, 2)).tril_()                      # (M*NC, C, C)
        nd = torch.baddbmm(inter, A, v_c).view(H, B, NC * C, E)
        if pad:
            nd = nd[:, :, :N]

    out = nd[..., :Dv] / (nd[..., Dv:] + eps)                                  # (H, B, N, Dv)
    out = out.permute(1, 2, 0, 3)                                              # (B, N, H, Dv)
    if output_final_state:
        S_fin = S_fin.transpose(0, 1)                                          # (B, H, K, Dv+1)
        return out, (S_fin[..., :Dv].contiguous(), S_fin[..., Dv].contiguous())
    return out
