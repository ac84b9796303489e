"""GMA as MLX operations: the chunked forward and a hand-written backward, both plain MLX graphs.

Everything here is built from MLX operations (matmul, softmax, cumsum, ...), wrapped in an
``mx.custom_function`` whose vjp is itself MLX operations. The op is therefore lazy like any MLX
op, runs on whatever device and stream the caller's code runs on (the GPU through Metal or MLX's
CUDA backend, as well as the CPU), and composes with ``mx.compile`` (forward and gradients),
``mx.vmap``, ``mx.grad`` / ``mx.vjp`` and ``nn.value_and_grad``.

Numerics (the same math as the compiled core, docs/design.md section 1):

* All arithmetic runs in the accumulator dtype (float32; float64 for float64 inputs, CPU only):
  the caller up-casts float16 / bfloat16 inputs and casts the output back.
* The sequence is cut into chunks of ``CHUNK`` rows (the tail chunk zero-padded; padded keys write
  nothing). Responsibilities use a centred quadratic form: with ``c`` the mean of a chunk's real
  rows (key padding mask True, not padding), ``sum_d lam (x - mu)^2 = (x'^2) lam^T - 2 x' (lam mu')^T + sum_d lam mu'^2`` on
  ``x' = x - c``, ``mu' = mu - c``: three matmul-shaped terms whose cancellation error scales with
  the distance of the data and the means from the chunk mean, not from the origin. The core also
  recomputes rows whose error bound is poor in the direct form; this path does not (it has no
  per-row branches), which matters only for data far from its chunk mean next to tiny variances.
* The state is carried between chunks as an exclusive prefix sum over the chunks' sums (a
  ``Gk^T [V, 1]`` product per chunk), and the causal backward's state gradients as the reverse
  (suffix) sum. Both, and the sums over chunks of the bidirectional state and of the parameter
  gradients, are blocked: sums of ``SCAN_GROUP`` chunks, then sums of those, recursively, so a
  float32 sum over ``n`` chunks has a rounding error of about ``SCAN_GROUP * log(n) / log(SCAN_GROUP)``
  ulp instead of the ``n`` ulp of one running sum (the core uses compensated additions, which are
  sequential and a few times more accurate still; at N = 65536 both stay within 2x of each other).
* The log-normaliser ``logpi - 0.5 sum_d log sigma2`` is shifted by its maximum over the
  components before the softmax (shift invariant), so no large constant rounds differently per
  component.
* In float64, exp and the functions built on it are computed here (see _exp): MLX's own are only
  float32-accurate there.

Memory: the forward keeps the responsibilities (2 B H N K) and the denominators (B H N) as extra
outputs of the custom function for the vjp; a causal chunk's ``C x C`` score block exists only
transiently (B H N C per chunked product).
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

__all__ = ["CHUNK", "SCAN_GROUP", "gma_attention_native"]

CHUNK = 64  # rows per chunk: the causal intra-chunk block is CHUNK x CHUNK
SCAN_GROUP = 16  # chunks per level of the blocked sums over chunks


# ---------------------------------------------------------------------------------------------
# layout: (B, N, H, F) <-> chunks (B, H, NC, C, F)

class _Chunking:
    """How a sequence of N rows is cut into NC chunks of C rows (the last one zero-padded), and
    which rows are real: `keep` (B or 1, 1, NC, C, 1) is 1 for rows with mask True that are not
    padding, None when all rows are."""

    def __init__(self, N: int, dtype, mask: Optional[mx.array]):
        self.N = N
        self.C = min(CHUNK, N)
        self.NC = -(-N // self.C)
        self.pad = self.NC * self.C - N
        self.keep = None
        if mask is not None or self.pad:
            keep = mx.ones((1, N), dtype=dtype) if mask is None else mask.astype(dtype)
            if self.pad:
                keep = mx.pad(keep, [(0, 0), (0, self.pad)])
            self.keep = keep.reshape(keep.shape[0], 1, self.NC, self.C, 1)
            # real rows per chunk (at least 1: a chunk without any has a centre of 0)
            self.rows = mx.maximum(mx.sum(self.keep, axis=3, keepdims=True), 1.0)

    def centre(self, xc: mx.array) -> mx.array:
        """Each chunk's mean over its real rows: (B, H, NC, C, D) -> (B, H, NC, 1, D). Padding and
        masked rows may hold anything (padding tokens far from the data would make their chunk's
        centre useless for the real rows), so they are left out."""
        if self.keep is None:
            return mx.mean(xc, axis=3, keepdims=True)
        return mx.sum(xc * self.keep, axis=3, keepdims=True) / self.rows

    def split(self, x: mx.array) -> mx.array:
        """(B, N, H, F) -> (B, H, NC, C, F), padded rows zero."""
        B, N, H, F = x.shape
        x = x.transpose(0, 2, 1, 3)
        if self.pad:
            x = mx.pad(x, [(0, 0), (0, 0), (0, self.pad), (0, 0)])
        return x.reshape(B, H, self.NC, self.C, F)

    def join(self, x: mx.array) -> mx.array:
        """(B, H, NC, C, F) -> (B, N, H, F), padded rows dropped."""
        B, H, NC, C, F = x.shape
        x = x.reshape(B, H, NC * C, F)
        if self.pad:
            x = x[:, :, : self.N]
        return x.transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# blocked sums over the chunk axis (axis 2 of (B, H, NC, ...))

def _group(x: mx.array) -> mx.array:
    """(B, H, n, ...) -> (B, H, ceil(n / G), G, ...), zero-padded."""
    n = x.shape[2]
    m = -(-n // SCAN_GROUP)
    if m * SCAN_GROUP != n:
        pads = [(0, 0)] * x.ndim
        pads[2] = (0, m * SCAN_GROUP - n)
        x = mx.pad(x, pads)
    return x.reshape(*x.shape[:2], m, SCAN_GROUP, *x.shape[3:])


def chunk_total(x: mx.array) -> mx.array:
    """Sum over axis 2, blocked: (B, H, n, ...) -> (B, H, ...)."""
    while x.shape[2] > SCAN_GROUP:
        x = _group(x).sum(axis=3)
    return x.sum(axis=2)


def exclusive_scan(x: mx.array, reverse: bool = False) -> Tuple[mx.array, mx.array]:
    """Exclusive prefix sums over axis 2 (suffix sums when `reverse`) and the total, blocked.

    Returns (scan, total): scan[:, :, c] = sum of x[:, :, c'] over c' < c (c' > c when reverse).
    """
    n = x.shape[2]
    if n <= SCAN_GROUP:
        scan = mx.cumsum(x, axis=2, reverse=reverse, inclusive=False)
        edge = 0 if reverse else n - 1
        return scan, scan[:, :, edge] + x[:, :, edge]
    grouped = _group(x)  # zero padding at the end: adds nothing to prefix or suffix sums
    inner = mx.cumsum(grouped, axis=3, reverse=reverse, inclusive=False)
    edge = 0 if reverse else SCAN_GROUP - 1
    group_sums = inner[:, :, :, edge] + grouped[:, :, :, edge]
    outer, total = exclusive_scan(group_sums, reverse)
    scan = inner + mx.expand_dims(outer, 3)
    scan = scan.reshape(*x.shape[:2], -1, *x.shape[3:])[:, :, :n]
    return scan, total


# ---------------------------------------------------------------------------------------------
# exp and its relatives, accurate in float64
#
# MLX's CPU backend evaluates exp (and so softmax, logaddexp, logsumexp, sigmoid) in float64 with
# float32-like accuracy (about 1e-8 relative); log and log1p are accurate. For float64 the exp is
# therefore computed here: exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in
# two so that n ln 2 is exact), exp(r) by its Taylor polynomial of degree 13 (|r| <= ln2 / 2:
# truncation below 1e-17), 2^n from the exponent bits. Other dtypes use MLX's own functions.

_LN2_HI = 0.6931471803691238  # ln 2 to 32 bits: n * _LN2_HI is exact for |n| < 2^20
_LN2_LO = 1.9082149292705877e-10  # ln 2 - _LN2_HI
_EXP_TAYLOR_DEGREE = 13


def _exp(x: mx.array) -> mx.array:
    if x.dtype != mx.float64:
        return mx.exp(x)
    x = mx.clip(x, -708.0, 709.0)  # 2^n stays a normal number; exp(-708) ~ 3e-308 is zero enough
    n = mx.stop_gradient(mx.floor(x * (1.0 / 0.6931471805599453) + 0.5))
    r = (x - n * _LN2_HI) - n * _LN2_LO
    poly = mx.ones_like(r)
    for degree in range(_EXP_TAYLOR_DEGREE, 0, -1):  # Horner: 1 + r/1 (1 + r/2 (1 + ...))
        poly = 1.0 + poly * r * (1.0 / degree)
    two_n = mx.stop_gradient(((n.astype(mx.int64) + 1023) << 52).view(mx.float64))
    return poly * two_n


def _softmax(x: mx.array, axis: int = -1) -> mx.array:
    if x.dtype != mx.float64:
        return mx.softmax(x, axis=axis)
    e = _exp(x - mx.stop_gradient(mx.max(x, axis=axis, keepdims=True)))
    return e / mx.sum(e, axis=axis, keepdims=True)


def _log_softmax(x: mx.array, axis: int = -1) -> mx.array:
    if x.dtype != mx.float64:
        return x - mx.logsumexp(x, axis=axis, keepdims=True)
    shifted = x - mx.stop_gradient(mx.max(x, axis=axis, keepdims=True))
    return shifted - mx.log(mx.sum(_exp(shifted), axis=axis, keepdims=True))


def _softplus(x: mx.array) -> mx.array:
    if x.dtype != mx.float64:
        return mx.logaddexp(x, mx.zeros_like(x))
    return mx.maximum(x, 0.0) + mx.log1p(_exp(-mx.abs(x)))


def _sigmoid(x: mx.array) -> mx.array:
    if x.dtype != mx.float64:
        return mx.sigmoid(x)
    e = _exp(-mx.abs(x))
    return mx.where(x >= 0, 1.0, e) / (1.0 + e)


# ---------------------------------------------------------------------------------------------
# the mixture and the responsibilities

class _Mixture:
    """sigma2, lam, the shifted log-normaliser and friends of one call, (H, K, D) / (H, K)."""

    def __init__(self, mu: mx.array, omega: mx.array, alpha: mx.array, sigma_eps: float):
        self.mu = mu
        self.omega = omega
        self.alpha = alpha
        sigma2 = _softplus(omega) + sigma_eps
        self.lam = 1.0 / sigma2
        logpi = _log_softmax(alpha)
        log_norm = logpi - 0.5 * mx.sum(mx.log(sigma2), axis=-1)
        # softmax is shift invariant: drop the largest constant so none rounds differently per component
        self.log_norm = log_norm - mx.stop_gradient(mx.max(log_norm, axis=-1, keepdims=True))

    def broadcast(self, x: mx.array) -> mx.array:
        """(H, K, ...) -> (1, H, 1, K, ...) against chunked (B, H, NC, ., .) arrays."""
        return mx.expand_dims(mx.expand_dims(x, 0), 2)


def _centred(xc: mx.array, chunking: _Chunking, mix: _Mixture) -> Tuple[mx.array, mx.array]:
    """x' = x - c and mu' = mu - c with c each chunk's mean over its real rows (queries too: the
    outputs of masked rows are defined but need not be as accurate as the real rows').

    xc (B, H, NC, C, D) -> x' (B, H, NC, C, D), mu' (B, H, NC, K, D)."""
    c = chunking.centre(xc)
    return xc - c, mix.broadcast(mix.mu) - c


def _responsibilities(xc: mx.array, chunking: _Chunking, mix: _Mixture) -> mx.array:
    """gamma (B, H, NC, C, K) = softmax_k(log_norm - 0.5 sum_d lam (x - mu)^2), centred form."""
    xp, mup = _centred(xc, chunking, mix)
    lam = mix.broadcast(mix.lam)  # (1, H, 1, K, D)
    lam_mu = lam * mup  # (B, H, NC, K, D)
    quad = (xp * xp) @ lam.swapaxes(-1, -2) - 2.0 * (xp @ lam_mu.swapaxes(-1, -2))
    quad = quad + mx.expand_dims(mx.sum(lam_mu * mup, axis=-1), 3)
    scores = mix.broadcast(mix.log_norm)[..., None, :] - 0.5 * quad  # log_norm as (1, H, 1, 1, K)
    return _softmax(scores)


def _responsibilities_backward(xc: mx.array, gamma: mx.array, dgamma: mx.array, chunking: _Chunking,
                               mix: _Mixture):
    """From d(loss)/d(gamma) to dx (B, H, NC, C, D) and this path's parameter sums.

    Returns dx and (dmu, dsigma2, dlog_norm_rows): (H, K, D), (H, K, D), (H, K) summed over the
    batch and every row. With ds = gamma (dgamma - sum_k gamma dgamma) (the softmax backward):
    dx = -sum_k ds lam (x - mu), dmu = sum_i ds lam (x - mu),
    dsigma2 = -0.5 sum_i ds (1 / sigma2 - lam^2 (x - mu)^2), d(logpi) = sum_i ds,
    every (x - mu) taken as x' - mu' about the chunk mean (as in the forward)."""
    ds = gamma * (dgamma - mx.sum(gamma * dgamma, axis=-1, keepdims=True))
    xp, mup = _centred(xc, chunking, mix)
    lam = mix.broadcast(mix.lam)  # (1, H, 1, K, D)
    lam_mu = lam * mup
    dx = ds @ lam_mu - xp * (ds @ lam)
    col = mx.expand_dims(mx.sum(ds, axis=3), -1)  # (B, H, NC, K, 1): sum over a chunk's rows
    ds_t = ds.swapaxes(-1, -2)
    ds_x = ds_t @ xp  # (B, H, NC, K, D)
    ds_xx = ds_t @ (xp * xp)
    sq = ds_xx - 2.0 * mup * ds_x + mup * mup * col  # sum_i ds (x - mu)^2 per chunk
    dmu = lam * (ds_x - mup * col)
    dsigma2 = 0.5 * lam * (lam * sq - col)

    def total(x):  # over chunks (blocked), then batch
        return chunk_total(x).sum(axis=0)

    return dx, (total(dmu), total(dsigma2), total(col[..., 0]))


def _values_with_ones(vc: mx.array) -> mx.array:
    """[V, 1]: the last column of every product with it is the denominator part (z, Gq . z)."""
    return mx.concatenate([vc, mx.ones((*vc.shape[:-1], 1), dtype=vc.dtype)], axis=-1)


def _causal_mask(C: int, dtype) -> mx.array:
    return mx.tril(mx.ones((C, C), dtype=dtype))


def _states(gk: mx.array, v1: mx.array, state0: Optional[mx.array], causal: bool):
    """The state each chunk reads (causal: before the chunk; bidirectional: the total, broadcast over
    chunks) and the final state, both [S, z] with E = Dv + 1 columns."""
    sums = gk.swapaxes(-1, -2) @ v1  # (B, H, NC, K, E)
    if causal:
        before, total = exclusive_scan(sums)
        if state0 is not None:
            before = before + mx.expand_dims(state0, 2)
    else:
        total = chunk_total(sums)
    if state0 is not None:
        total = total + state0
    if not causal:
        before = mx.expand_dims(total, 2)
    return before, total


def _forward(q, k, v, mix: _Mixture, mask, state0, *, causal: bool, eps: float):
    """Returns out (B, N, H, Dv), the final state [S, z] (B, H, K, E), gamma of q and of k
    (B, H, NC, C, K; keys masked) and den (B, H, NC, C)."""
    N, Dv = q.shape[1], v.shape[-1]
    chunking = _Chunking(N, q.dtype, mask)
    gq = _responsibilities(chunking.split(q), chunking, mix)
    gk = _responsibilities(chunking.split(k), chunking, mix)
    if chunking.keep is not None:
        gk = gk * chunking.keep
    v1 = _values_with_ones(chunking.split(v))
    before, total = _states(gk, v1, state0, causal)
    nd = gq @ before  # (B, H, NC, C, E)
    if causal:
        nd = nd + (_causal_mask(chunking.C, q.dtype) * (gq @ gk.swapaxes(-1, -2))) @ v1
    den = nd[..., Dv]
    out = nd[..., :Dv] / mx.expand_dims(den + eps, -1)
    return chunking.join(out), total, gq, gk, den


def _backward(q, k, v, mix: _Mixture, mask, state0, out, gq, gk, den, dout, dfinal, dgq_out, dgk_out, dden_out, *,
              causal: bool, eps: float):
    """Gradients of q, k, v (B, N, H, .), mu, omega, alpha and the initial state [S, z] (or None).

    dfinal: the cotangent of the final state [S, z] (B, H, K, E). dgq_out, dgk_out, dden_out: the
    cotangents of the forward's responsibilities and denominators. The caller never sees those, so
    they are zero for a gradient; they are not in a gradient of a gradient, whose vjp reads the
    forward's outputs."""
    N, Dv = q.shape[1], v.shape[-1]
    chunking = _Chunking(N, q.dtype, mask)
    v1 = _values_with_ones(chunking.split(v))
    before, _ = _states(gk, v1, state0, causal)
    inv = 1.0 / (den + eps)
    g = chunking.split(dout)
    dnum = g * mx.expand_dims(inv, -1)
    dden = -mx.sum(g * chunking.split(out), axis=-1) * inv + dden_out
    dnd = mx.concatenate([dnum, mx.expand_dims(dden, -1)], axis=-1)  # (B, H, NC, C, E)
    dbefore = gq.swapaxes(-1, -2) @ dnd  # cotangent of the state each chunk read (B, H, NC, K, E)
    if causal:
        # a chunk's sums reach the states read by every later chunk, and the final state
        dsums, dstate0 = exclusive_scan(dbefore, reverse=True)
    else:
        dstate0 = chunk_total(dbefore)
        dsums = mx.expand_dims(dstate0, 2)
    dstate0 = dstate0 + dfinal
    dsums = dsums + mx.expand_dims(dfinal, 2)
    dgq = dnd @ before.swapaxes(-1, -2) + dgq_out
    dgk = v1 @ dsums.swapaxes(-1, -2) + dgk_out
    dv1 = gk @ dsums
    if causal:
        tril = _causal_mask(chunking.C, q.dtype)
        scores = tril * (gq @ gk.swapaxes(-1, -2))  # (B, H, NC, C, C)
        dscores = tril * (dnd @ v1.swapaxes(-1, -2))
        dgq = dgq + dscores @ gk
        dgk = dgk + dscores.swapaxes(-1, -2) @ gq
        dv1 = dv1 + scores.swapaxes(-1, -2) @ dnd
    if chunking.keep is not None:
        dgk = dgk * chunking.keep
    # gk is the softmax times keep; the softmax backward needs the softmax itself, but only where
    # keep is 1 (elsewhere dgk is now zero), and there the two agree
    dq, (dmu_q, dsig_q, dln_q) = _responsibilities_backward(chunking.split(q), gq, dgq, chunking, mix)
    dk, (dmu_k, dsig_k, dln_k) = _responsibilities_backward(chunking.split(k), gk, dgk, chunking, mix)
    dsigma2 = dsig_q + dsig_k
    domega = dsigma2 * _sigmoid(mix.omega)
    dlogpi = dln_q + dln_k  # log_norm = logpi - 0.5 sum log sigma2: that term is in dsigma2
    dalpha = dlogpi - _softmax(mix.alpha) * mx.sum(dlogpi, axis=-1, keepdims=True)
    dv = chunking.join(dv1[..., :Dv])
    return chunking.join(dq), chunking.join(dk), dv, dmu_q + dmu_k, domega, dalpha, dstate0


def _join_state(S: mx.array, z: mx.array) -> mx.array:
    return mx.concatenate([S, mx.expand_dims(z, -1)], axis=-1)


def build_native_op(*, causal: bool, eps: float, sigma_eps: float, has_mask: bool, has_state: bool):
    """The custom function for one set of options. Its arguments: q, k, v (B, N, H, .), mu, omega,
    alpha, then the mask (B, N) if `has_mask`, then S0, z0 if `has_state`, all arrays of the
    accumulator dtype (the mask bool). Returns out, S_final, z_final and, for the vjp only, the
    responsibilities of q and k and the denominators."""

    def unpack(primals):
        q, k, v, mu, omega, alpha = primals[:6]
        rest = list(primals[6:])
        mask = rest.pop(0) if has_mask else None
        state0 = _join_state(rest[0], rest[1]) if has_state else None
        return q, k, v, _Mixture(mu, omega, alpha, sigma_eps), mask, state0

    @mx.custom_function
    def op(*primals):
        q, k, v, mix, mask, state0 = unpack(primals)
        out, total, gq, gk, den = _forward(q, k, v, mix, mask, state0, causal=causal, eps=eps)
        Dv = v.shape[-1]
        return out, total[..., :Dv], total[..., Dv], gq, gk, den

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        q, k, v, mix, mask, state0 = unpack(primals)
        out, _, _, gq, gk, den = outputs
        dout, dS, dz, dgq_out, dgk_out, dden_out = (c.astype(q.dtype) for c in cotangents)
        dq, dk, dv, dmu, domega, dalpha, dstate0 = _backward(
            q, k, v, mix, mask, state0, out, gq, gk, den, dout, _join_state(dS, dz), dgq_out, dgk_out, dden_out,
            causal=causal, eps=eps,
        )
        grads = [dq, dk, dv, dmu, domega, dalpha]
        if has_mask:
            grads.append(mx.zeros_like(mask))
        if has_state:
            Dv = v.shape[-1]
            grads += [dstate0[..., :Dv], dstate0[..., Dv]]
        return tuple(grads)

    return op


def gma_attention_native(q, k, v, mu, omega, alpha, mask, S0, z0, *, causal: bool, eps: float,
                         sigma_eps: float):
    """Runs the MLX-native op on checked arguments (q, k, v, mu, omega, alpha, S0, z0 already in the
    accumulator dtype); returns (out, S_final, z_final)."""
    op = build_native_op(causal=causal, eps=eps, sigma_eps=sigma_eps, has_mask=mask is not None,
                         has_state=S0 is not None)
    primals = [q, k, v, mu, omega, alpha]
    if mask is not None:
        primals.append(mask)
    if S0 is not None:
        primals += [S0, z0]
    out, S_final, z_final, _, _, _ = op(*primals)
    return out, S_final, z_final
