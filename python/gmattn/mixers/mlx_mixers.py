"""The MLX mixers: the same kinds, calling convention, state and parameter names as the torch
mixers in gmattn.mixers.torch_mixers, so weights exchange exactly between the two.

    y = mixer(x, key_padding_mask=None)                          # x: (B, N, d_model)
    y, state = mixer(x, key_padding_mask=None, state=state, return_state=True)
    y = mixer(x, cu_seqlens=offsets)                             # x: (1, N, d_model), S packed sequences
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..mlx.layers import GaussianMixtureAttention
from ._common import LINEAR_CHUNK, SSM_CHUNK, SSM_NORM_EPS, ArrayOps, Exchange, check_call, gma_layer_arguments
from ._common import init_projected_mixer, init_ssm_mixer, orthogonal_random_features, run_mixer
from .config import MixerConfig


def _acc(dtype) -> mx.Dtype:
    return mx.float32  # MLX has no float64 on the GPU; the accumulator is float32


MLX_OPS = ArrayOps(concat=lambda arrays, axis: mx.concatenate(arrays, axis=axis),
                   zeros=lambda like, shape: mx.zeros(shape, dtype=like.dtype))


# ----------------------------------------------------------------------------------------------
# Linear-attention core shared by "linear" and "performer"
# ----------------------------------------------------------------------------------------------
def linear_attention(fq: mx.array, fk: mx.array, v: mx.array, causal: bool, state, eps: float,
                     chunk: int = LINEAR_CHUNK):
    """MLX twin of gmattn.mixers.torch_mixers.linear_attention (same math, same chunking)."""
    B, H, N, Fd = fq.shape
    Dv = v.shape[-1]
    if state is None:
        S0 = mx.zeros((B, H, Fd, Dv), dtype=fq.dtype)
        z0 = mx.zeros((B, H, Fd), dtype=fq.dtype)
    else:
        S0, z0 = state[0].astype(fq.dtype), state[1].astype(fq.dtype)
    if not causal:
        S = S0 + mx.swapaxes(fk, -1, -2) @ v
        z = z0 + fk.sum(2)
        den = fq @ z[..., None]
        return (fq @ S) / (den + eps), (S, z)
    C = max(1, min(chunk, N))
    pad = (-N) % C
    if pad:
        widths = [(0, 0), (0, 0), (0, pad), (0, 0)]
        fq, fk, v = (mx.pad(t, widths) for t in (fq, fk, v))
    n = (N + pad) // C
    fq = fq.reshape(B, H, n, C, Fd)
    fk = fk.reshape(B, H, n, C, Fd)
    v = v.reshape(B, H, n, C, Dv)
    S_incl = S0[:, :, None] + mx.cumsum(mx.swapaxes(fk, -1, -2) @ v, axis=2)
    z_incl = z0[:, :, None] + mx.cumsum(fk.sum(3), axis=2)
    S_excl = mx.concatenate([S0[:, :, None], S_incl[:, :, :-1]], axis=2)
    z_excl = mx.concatenate([z0[:, :, None], z_incl[:, :, :-1]], axis=2)
    tril = mx.tril(mx.ones((C, C), dtype=fq.dtype))
    A = (fq @ mx.swapaxes(fk, -1, -2)) * tril
    num = fq @ S_excl + A @ v
    den = (fq @ z_excl[..., None])[..., 0] + A.sum(-1)
    out = (num / (den[..., None] + eps)).reshape(B, H, n * C, Dv)[:, :, :N]
    return out, (S_incl[:, :, -1], z_incl[:, :, -1])


def favor_features(x: mx.array, W: mx.array, is_query: bool) -> mx.array:
    """MLX twin of gmattn.mixers.torch_mixers.favor_features."""
    D, M = x.shape[-1], W.shape[1]
    x = x * D ** -0.25
    logits = x @ mx.swapaxes(W, -1, -2) - 0.5 * (x * x).sum(-1, keepdims=True)
    if is_query:
        logits = logits - mx.stop_gradient(logits.max(-1, keepdims=True))
    return mx.exp(logits) * M ** -0.5


# ----------------------------------------------------------------------------------------------
# Selective state-space scan of the "ssm" kind: twins of the torch functions (same math, same chunking)
# ----------------------------------------------------------------------------------------------
def segment_sums(a: mx.array) -> mx.array:
    """MLX twin of gmattn.mixers.torch_mixers.segment_sums."""
    T = a.shape[-1]
    i = mx.arange(T)
    rows = mx.where(i[:, None] > i[None, :], a[..., :, None], mx.zeros((), dtype=a.dtype))
    return mx.where(i[:, None] >= i[None, :], mx.cumsum(rows, axis=-2), mx.array(-mx.inf, dtype=a.dtype))


def decayed_scan(g: mx.array, s: mx.array, h0: mx.array, group: int = SSM_CHUNK) -> mx.array:
    """MLX twin of gmattn.mixers.torch_mixers.decayed_scan."""
    n = g.shape[-1]
    if n <= group:
        return mx.exp(segment_sums(g)) @ s + mx.exp(mx.cumsum(g, axis=-1))[..., None] * h0[..., None, :]
    pad = (-n) % group
    if pad:
        g = mx.pad(g, [(0, 0)] * (g.ndim - 1) + [(0, pad)])
        s = mx.pad(s, [(0, 0)] * (s.ndim - 2) + [(0, pad), (0, 0)])
    m = (n + pad) // group
    g = g.reshape(*g.shape[:-1], m, group)
    s = s.reshape(*s.shape[:-2], m, group, s.shape[-1])
    local = mx.exp(segment_sums(g)) @ s
    ends = decayed_scan(g.sum(-1), local[..., -1, :], h0, group)
    entering = mx.concatenate([h0[..., None, :], ends[..., :-1, :]], axis=-2)
    h = local + mx.exp(mx.cumsum(g, axis=-1))[..., None] * entering[..., None, :]
    return h.reshape(*h.shape[:-3], m * group, h.shape[-1])[..., :n, :]


def selective_scan(x: mx.array, dt: mx.array, A: mx.array, B: mx.array, C: mx.array, initial_state=None,
                   diagonal: bool = True, chunk: int = SSM_CHUNK):
    """MLX twin of gmattn.mixers.torch_mixers.selective_scan."""
    Bt, N, H, P = x.shape
    S = B.shape[-1]
    L = max(1, min(chunk, N))
    pad = (-N) % L
    if pad:
        x, B, C, dt = (mx.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (x, B, C, dt))
    n = (N + pad) // L
    a = (dt * A).transpose(0, 2, 1).reshape(Bt, H, n, L)
    xdt = (x * dt[..., None]).transpose(0, 2, 1, 3).reshape(Bt, H, n, L, P)
    Bc, Cc = B.reshape(Bt, 1, n, L, S), C.reshape(Bt, 1, n, L, S)
    seg = segment_sums(a)
    decay = mx.exp(seg)
    if not diagonal:
        decay = decay * mx.tril(mx.ones((L, L), dtype=decay.dtype), k=-1)
    y = ((Cc @ mx.swapaxes(Bc, -1, -2)) * decay) @ xdt
    writes = mx.swapaxes(xdt * mx.exp(seg[..., -1, :])[..., None], -1, -2) @ Bc
    if initial_state is None:
        h0 = mx.zeros((Bt, H, P * S), dtype=x.dtype)
    else:
        h0 = initial_state.astype(x.dtype).reshape(Bt, H, P * S)
    ends = decayed_scan(a.sum(-1), writes.reshape(Bt, H, n, P * S), h0)
    entering = mx.concatenate([h0[:, :, None], ends[:, :, :-1]], axis=2).reshape(Bt, H, n, P, S)
    y = y + mx.exp(mx.cumsum(a, axis=-1))[..., None] * (Cc @ mx.swapaxes(entering, -1, -2))
    y = y.reshape(Bt, H, n * L, P)[:, :, :N].transpose(0, 2, 1, 3)
    return y, ends[:, :, -1].reshape(Bt, H, P, S)


def ssm_scan(x: mx.array, dt: mx.array, A: mx.array, B: mx.array, C: mx.array, causal: bool, initial_state=None):
    """MLX twin of gmattn.mixers.torch_mixers.ssm_scan (forward scan; bidirectional adds the reverse scan)."""
    y, h = selective_scan(x, dt, A, B, C, initial_state)
    if not causal:
        y_rev, _ = selective_scan(x[:, ::-1], dt[:, ::-1], A, B[:, ::-1], C[:, ::-1], diagonal=False)
        y = y + y_rev[:, ::-1]
    return y, h


def causal_conv(u: mx.array, tail: mx.array, weight: mx.array, bias: mx.array):
    """MLX twin of gmattn.mixers.torch_mixers.causal_conv."""
    W = weight.shape[1]
    full = mx.concatenate([tail, u], axis=1)
    N = u.shape[1]
    out = bias + sum(full[:, w: w + N] * weight[:, w] for w in range(W))
    return out, full[:, N:]


# ----------------------------------------------------------------------------------------------
# Mixers
# ----------------------------------------------------------------------------------------------
class GMAMixer(Exchange, GaussianMixtureAttention):
    """kind "gma": gmattn.mlx.GaussianMixtureAttention built from a MixerConfig."""

    def __init__(self, config: MixerConfig):
        GaussianMixtureAttention.__init__(self, **gma_layer_arguments(config))
        self.config = config


class _PackedCalls:
    """The calling convention of the baseline kinds (twin of torch_mixers._PackedCalls)."""

    def __call__(self, x: mx.array, key_padding_mask=None, state=None, return_state: bool = False,
                 cu_seqlens=None):
        return run_mixer(self, MLX_OPS, "mlx", x, key_padding_mask, state, return_state, cu_seqlens)


class _ProjectedMixer(Exchange, _PackedCalls, nn.Module):
    def __init__(self, config: MixerConfig, qk_dim: int):
        super().__init__()
        init_projected_mixer(self, nn.Linear, config, qk_dim)

    def _qkv(self, x: mx.array, key_padding_mask):
        B, N = check_call(type(self).__name__, self.config.d_model, x, key_padding_mask, framework="mlx")
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.astype(mx.bool_)
        H = self.num_heads
        q = self.q_proj(x).reshape(B, N, H, self.qk_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, N, H, self.qk_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, N, H, self.head_dim).transpose(0, 2, 1, 3)
        return q, k, v, key_padding_mask

    def _out(self, o: mx.array, x: mx.array) -> mx.array:
        B, H, N, Dv = o.shape
        return self.out_proj(o.astype(x.dtype).transpose(0, 2, 1, 3).reshape(B, N, H * Dv))


class SoftmaxAttention(_ProjectedMixer):
    """kind "softmax": mx.fast.scaled_dot_product_attention; the state is a KV cache
    (k (B, H, T, D), v (B, H, T, Dv), mask (B, T) bool). Rows with no readable key output zeros."""

    def __init__(self, config: MixerConfig):
        super().__init__(config, qk_dim=config.resolved_head_dim)

    def unpacked(self, x: mx.array, key_padding_mask, state, return_state: bool):
        q, k, v, mask = self._qkv(x, key_padding_mask)
        B, H, N, D = q.shape
        scale = D ** -0.5
        T = 0
        if state is not None:
            k_cache, v_cache, m_cache = state
            T = k_cache.shape[2]
            k = mx.concatenate([k_cache.astype(k.dtype), k], axis=2)
            v = mx.concatenate([v_cache.astype(v.dtype), v], axis=2)
            new = mask if mask is not None else mx.ones((B, N), dtype=mx.bool_)
            mask = mx.concatenate([m_cache.astype(mx.bool_), new], axis=1)
        if mask is None and T == 0:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if self.causal else None)
        else:
            Nk = T + N
            if self.causal:
                allowed = mx.arange(Nk)[None, :] <= (mx.arange(N)[:, None] + T)
            else:
                allowed = mx.ones((N, Nk), dtype=mx.bool_)
            allowed = mx.broadcast_to(allowed[None, None], (B, 1, N, Nk))
            if mask is not None:
                allowed = allowed & mask[:, None, None, :]
            readable = allowed.any(-1, keepdims=True)
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=allowed | ~readable)
            o = o * readable.astype(o.dtype)
        y = self._out(o, x)
        if not return_state:
            return y
        if mask is None:
            mask = mx.ones((B, T + N), dtype=mx.bool_)
        return y, (k, v, mask)


class LinearAttention(_ProjectedMixer):
    """kind "linear": elu+1 (or relu) feature map linear attention; state (S, z), float32."""

    def __init__(self, config: MixerConfig):
        super().__init__(config, qk_dim=config.resolved_head_dim)
        self.feature_map = config.feature_map

    def _phi(self, x: mx.array) -> mx.array:
        return nn.elu(x) + 1.0 if self.feature_map == "elu+1" else nn.relu(x)

    def unpacked(self, x: mx.array, key_padding_mask, state, return_state: bool):
        q, k, v, mask = self._qkv(x, key_padding_mask)
        acc = _acc(x.dtype)
        fq, fk = self._phi(q.astype(acc)), self._phi(k.astype(acc))
        if mask is not None:
            fk = fk * mask[:, None, :, None].astype(acc)
        o, new_state = linear_attention(fq, fk, v.astype(acc), self.causal, state, self.config.eps)
        y = self._out(o, x)
        return (y, new_state) if return_state else y


class PerformerAttention(_ProjectedMixer):
    """kind "performer": FAVOR+ positive orthogonal random features; state (S, z), float32.

    The random projections are the frozen parameter `features` (H, M, D): exported by
    `export_weights`, never trained. With config.redraw, each call in training mode without a
    state draws fresh features first (`redraw_features`).
    """

    def __init__(self, config: MixerConfig):
        super().__init__(config, qk_dim=config.resolved_head_dim)
        self.num_features = config.resolved_num_features
        self.redraw = config.redraw
        self.features = mx.array(
            orthogonal_random_features(config.num_heads, self.num_features, self.qk_dim, config.seed))
        self.freeze(recurse=False, keys=["features"])

    def redraw_features(self, seed: Optional[int] = None) -> None:
        """Replace the random features with a fresh draw (seed None = fresh entropy)."""
        W = orthogonal_random_features(self.num_heads, self.num_features, self.qk_dim, seed)
        self.features = mx.array(W).astype(self.features.dtype)

    def __call__(self, x: mx.array, key_padding_mask=None, state=None, return_state: bool = False,
                 cu_seqlens=None):
        if self.redraw and self.training and state is None:
            self.redraw_features()  # once per call, also for packed sequences
        return super().__call__(x, key_padding_mask, state, return_state, cu_seqlens)

    def unpacked(self, x: mx.array, key_padding_mask, state, return_state: bool):
        q, k, v, mask = self._qkv(x, key_padding_mask)
        acc = _acc(x.dtype)
        W = self.features.astype(acc)
        fq, fk = favor_features(q.astype(acc), W, True), favor_features(k.astype(acc), W, False)
        if mask is not None:
            fk = fk * mask[:, None, :, None].astype(acc)
        o, new_state = linear_attention(fq, fk, v.astype(acc), self.causal, state, self.config.eps)
        y = self._out(o, x)
        return (y, new_state) if return_state else y


class SelectiveSSM(Exchange, _PackedCalls, nn.Module):
    """kind "ssm": MLX twin of gmattn.mixers.torch_mixers.SelectiveSSM (same parameters, state and math)."""

    def __init__(self, config: MixerConfig):
        super().__init__()
        init_ssm_mixer(self, nn.Linear, mx.array, config, lambda shape: np.array(mx.random.uniform(shape=shape)))

    def unpacked(self, x: mx.array, key_padding_mask, state, return_state: bool):
        B, N = check_call(type(self).__name__, self.config.d_model, x, key_padding_mask, framework="mlx")
        H, P, S = self.num_heads, self.head_dim, self.state_dim
        acc = _acc(x.dtype)
        u = mx.concatenate([self.x_proj(x), self.B_proj(x), self.C_proj(x)], axis=-1).astype(acc)
        dt = nn.softplus(self.dt_proj(x).astype(acc) + self.dt_bias.astype(acc))
        if key_padding_mask is not None:
            real = key_padding_mask.astype(mx.bool_).astype(acc)[..., None]
            u, dt = u * real, dt * real
        if state is None:
            h0, tail = None, mx.zeros((B, max(self.conv_width - 1, 0), u.shape[-1]), dtype=acc)
        else:
            h0, tail = state
        if self.conv_width:
            u, tail = causal_conv(u, tail.astype(acc), self.conv_weight.astype(acc), self.conv_bias.astype(acc))
        u = nn.silu(u)
        xs = u[..., : H * P].reshape(B, N, H, P)
        Bs, Cs = u[..., H * P: H * P + S], u[..., H * P + S:]
        y, h = ssm_scan(xs, dt, -mx.exp(self.A_log.astype(acc)), Bs, Cs, self.causal, h0)
        y = (y + self.D.astype(acc)[:, None] * xs).reshape(B, N, H * P)
        g = y * nn.silu(self.z_proj(x).astype(acc))
        g = g * mx.rsqrt((g * g).mean(-1, keepdims=True) + SSM_NORM_EPS) * self.norm_weight.astype(acc)
        out = self.out_proj(g.astype(x.dtype))
        return (out, (h, tail)) if return_state else out


MIXERS = {"gma": GMAMixer, "softmax": SoftmaxAttention, "linear": LinearAttention, "performer": PerformerAttention,
          "ssm": SelectiveSSM}


def build(config: MixerConfig) -> nn.Module:
    return MIXERS[config.kind](config)
