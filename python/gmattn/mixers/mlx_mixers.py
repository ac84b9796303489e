"""The MLX mixers: the same kinds, calling convention, state and parameter names as the torch
mixers in gmattn.mixers.torch_mixers, so weights exchange exactly between the two.

    y = mixer(x, key_padding_mask=None)                          # x: (B, N, d_model)
    y, state = mixer(x, key_padding_mask=None, state=state, return_state=True)
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..mlx.layers import GaussianMixtureAttention
from ._common import LINEAR_CHUNK, Exchange, check_call, gma_layer_arguments, init_projected_mixer
from ._common import orthogonal_random_features
from .config import MixerConfig


def _acc(dtype) -> mx.Dtype:
    return mx.float32  # MLX has no float64 on the GPU; the accumulator is float32


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
# Mixers
# ----------------------------------------------------------------------------------------------
class GMAMixer(Exchange, GaussianMixtureAttention):
    """kind "gma": gmattn.mlx.GaussianMixtureAttention built from a MixerConfig."""

    def __init__(self, config: MixerConfig):
        GaussianMixtureAttention.__init__(self, **gma_layer_arguments(config))
        self.config = config


class _ProjectedMixer(Exchange, nn.Module):
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

    def __call__(self, x: mx.array, key_padding_mask=None, state=None, return_state: bool = False):
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

    def __call__(self, x: mx.array, key_padding_mask=None, state=None, return_state: bool = False):
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

    def __call__(self, x: mx.array, key_padding_mask=None, state=None, return_state: bool = False):
        if self.redraw and self.training and state is None:
            self.redraw_features()
        q, k, v, mask = self._qkv(x, key_padding_mask)
        acc = _acc(x.dtype)
        W = self.features.astype(acc)
        fq, fk = favor_features(q.astype(acc), W, True), favor_features(k.astype(acc), W, False)
        if mask is not None:
            fk = fk * mask[:, None, :, None].astype(acc)
        o, new_state = linear_attention(fq, fk, v.astype(acc), self.causal, state, self.config.eps)
        y = self._out(o, x)
        return (y, new_state) if return_state else y


MIXERS = {"gma": GMAMixer, "softmax": SoftmaxAttention, "linear": LinearAttention, "performer": PerformerAttention}


def build(config: MixerConfig) -> nn.Module:
    return MIXERS[config.kind](config)
