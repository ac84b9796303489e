"""The PyTorch mixers: gma, softmax, linear, performer behind one calling convention.

    y = mixer(x, key_padding_mask=None)                          # x: (B, N, d_model)
    y, state = mixer(x, key_padding_mask=None, state=state, return_state=True)

`state` carries what the mixer has read so far (see gmattn.mixers.CAUSAL_STATE); feeding a
sequence in pieces with the state handed across equals one run over the whole sequence.
`key_padding_mask` (B, N) bool, True = real token: masked keys are never read.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..torch.layers import GaussianMixtureAttention
from ._common import LINEAR_CHUNK, Exchange, check_call, gma_layer_arguments, init_projected_mixer
from ._common import orthogonal_random_features
from .config import MixerConfig


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Linear-attention core shared by "linear" and "performer"
# ----------------------------------------------------------------------------------------------
def linear_attention(fq: Tensor, fk: Tensor, v: Tensor, causal: bool, state, eps: float,
                     chunk: int = LINEAR_CHUNK):
    """out[i] = fq[i] S / (fq[i] . z + eps), S = S0 + sum_j fk[j]^T v[j], z = z0 + sum_j fk[j].

    fq, fk: (B, H, N, F) non-negative features (fk zero on masked keys); v: (B, H, N, Dv), all in
    the accumulator dtype. Causal runs a chunked scan: quadratic inside chunks of `chunk`
    positions, the running state across them, so memory is O(N (F + Dv) + N/chunk F Dv).
    Returns out (B, H, N, Dv) and the final state (S (B, H, F, Dv), z (B, H, F)).
    """
    B, H, N, Fd = fq.shape
    Dv = v.shape[-1]
    if state is None:
        S0 = fq.new_zeros(B, H, Fd, Dv)
        z0 = fq.new_zeros(B, H, Fd)
    else:
        S0, z0 = state[0].to(fq.dtype), state[1].to(fq.dtype)
    if not causal:
        S = S0 + fk.transpose(-1, -2) @ v
        z = z0 + fk.sum(2)
        den = fq @ z.unsqueeze(-1)
        return (fq @ S) / (den + eps), (S, z)
    C = max(1, min(chunk, N))
    pad = (-N) % C
    if pad:
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    n = (N + pad) // C
    fq = fq.reshape(B, H, n, C, Fd)
    fk = fk.reshape(B, H, n, C, Fd)
    v = v.reshape(B, H, n, C, Dv)
    S_incl = S0.unsqueeze(2) + (fk.transpose(-1, -2) @ v).cumsum(2)  # (B, H, n, F, Dv)
    z_incl = z0.unsqueeze(2) + fk.sum(3).cumsum(2)  # (B, H, n, F)
    S_excl = torch.cat([S0.unsqueeze(2), S_incl[:, :, :-1]], dim=2)
    z_excl = torch.cat([z0.unsqueeze(2), z_incl[:, :, :-1]], dim=2)
    A = torch.tril(fq @ fk.transpose(-1, -2))  # (B, H, n, C, C)
    num = fq @ S_excl + A @ v
    den = (fq @ z_excl.unsqueeze(-1)).squeeze(-1) + A.sum(-1)
    out = (num / (den.unsqueeze(-1) + eps)).reshape(B, H, n * C, Dv)[:, :, :N]
    return out, (S_incl[:, :, -1], z_incl[:, :, -1])


def favor_features(x: Tensor, W: Tensor, is_query: bool) -> Tensor:
    """FAVOR+ positive features exp(w.x' - |x'|^2/2)/sqrt(M), x' = x D^-1/4, so that
    E[phi(q).phi(k)] = exp(q.k/sqrt(D)). Query rows are divided by their largest feature (it
    cancels in the read); keys need no stabiliser since w.x' - |x'|^2/2 <= |w|^2/2.
    x: (B, H, N, D), W: (H, M, D) -> (B, H, N, M)."""
    D, M = x.shape[-1], W.shape[1]
    x = x * D ** -0.25
    logits = x @ W.transpose(-1, -2) - 0.5 * (x * x).sum(-1, keepdim=True)
    if is_query:
        logits = logits - logits.amax(-1, keepdim=True).detach()
    return torch.exp(logits) * M ** -0.5


# ----------------------------------------------------------------------------------------------
# Mixers
# ----------------------------------------------------------------------------------------------
class GMAMixer(Exchange, GaussianMixtureAttention):
    """kind "gma": gmattn.torch.GaussianMixtureAttention built from a MixerConfig."""

    def __init__(self, config: MixerConfig):
        GaussianMixtureAttention.__init__(self, **gma_layer_arguments(config))
        self.config = config


class _ProjectedMixer(Exchange, nn.Module):
    """q/k/v/out projections and the (B, H, N, .) layout shared by the baseline kinds."""

    def __init__(self, config: MixerConfig, qk_dim: int):
        super().__init__()
        init_projected_mixer(self, nn.Linear, config, qk_dim)

    def _qkv(self, x: Tensor, key_padding_mask: Optional[Tensor]):
        B, N = check_call(type(self).__name__, self.config.d_model, x, key_padding_mask, framework="torch")
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(device=x.device, dtype=torch.bool)
        H = self.num_heads
        q = self.q_proj(x).view(B, N, H, self.qk_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, H, self.qk_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, H, self.head_dim).transpose(1, 2)
        return q, k, v, key_padding_mask

    def _out(self, o: Tensor, x: Tensor) -> Tensor:
        B, H, N, Dv = o.shape
        return self.out_proj(o.to(x.dtype).transpose(1, 2).reshape(B, N, H * Dv))

    def extra_repr(self) -> str:
        return f"kind={self.config.kind!r}, d_model={self.config.d_model}, num_heads={self.num_heads}, " \
               f"head_dim={self.head_dim}, causal={self.causal}"


class SoftmaxAttention(_ProjectedMixer):
    """kind "softmax": multi-head softmax attention via torch's scaled_dot_product_attention.

    The state is a KV cache (k (B, H, T, D), v (B, H, T, Dv), mask (B, T) bool). Query rows that
    can read no key at all (every visible key masked) output zeros rather than NaN.
    """

    def __init__(self, config: MixerConfig):
        super().__init__(config, qk_dim=config.resolved_head_dim)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, state=None,
                return_state: bool = False):
        q, k, v, mask = self._qkv(x, key_padding_mask)
        B, H, N, _ = q.shape
        T = 0
        if state is not None:
            k_cache, v_cache, m_cache = state
            T = k_cache.shape[2]
            k = torch.cat([k_cache.to(k.dtype), k], dim=2)
            v = torch.cat([v_cache.to(v.dtype), v], dim=2)
            new = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
            mask = torch.cat([m_cache.to(torch.bool), new], dim=1)
        if mask is None and T == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            Nk = T + N
            allowed = torch.ones(N, Nk, dtype=torch.bool, device=x.device)
            if self.causal:
                i = torch.arange(N, device=x.device).unsqueeze(1)
                allowed = torch.arange(Nk, device=x.device).unsqueeze(0) <= i + T
            allowed = allowed.expand(B, 1, N, Nk)
            if mask is not None:
                allowed = allowed & mask[:, None, None, :]
            readable = allowed.any(-1, keepdim=True)  # (B, 1, N, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~readable)
            o = o * readable.to(o.dtype)
        y = self._out(o, x)
        if not return_state:
            return y
        if mask is None:
            mask = torch.ones(B, T + N, dtype=torch.bool, device=x.device)
        return y, (k, v, mask)


class LinearAttention(_ProjectedMixer):
    """kind "linear": linear attention with a positive feature map (elu+1 by default;
    Katharopoulos et al. 2020). The state is (S (B, H, D, Dv), z (B, H, D)), float32."""

    def __init__(self, config: MixerConfig):
        super().__init__(config, qk_dim=config.resolved_head_dim)
        self.feature_map = config.feature_map

    def _phi(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1.0 if self.feature_map == "elu+1" else F.relu(x)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, state=None,
                return_state: bool = False):
        q, k, v, mask = self._qkv(x, key_padding_mask)
        acc = _acc(x.dtype)
        fq, fk = self._phi(q.to(acc)), self._phi(k.to(acc))
        if mask is not None:
            fk = fk * mask[:, None, :, None].to(acc)
        o, new_state = linear_attention(fq, fk, v.to(acc), self.causal, state, self.config.eps)
        y = self._out(o, x)
        return (y, new_state) if return_state else y


class PerformerAttention(_ProjectedMixer):
    """kind "performer": FAVOR+ with M positive orthogonal random features (Choromanski et al.
    2021) approximating softmax attention. The state is (S (B, H, M, Dv), z (B, H, M)), float32.

    The random projections are the buffer `features` (H, M, D): part of `state_dict` and of
    `export_weights`, so an exchanged mixer is exact. With config.redraw, each forward call in
    training mode without a state draws fresh features first (`redraw_features`).
    """

    def __init__(self, config: MixerConfig):
        super().__init__(config, qk_dim=config.resolved_head_dim)
        self.num_features = config.resolved_num_features
        self.redraw = config.redraw
        W = orthogonal_random_features(config.num_heads, self.num_features, self.qk_dim, config.seed)
        self.register_buffer("features", torch.from_numpy(W))

    @torch.no_grad()
    def redraw_features(self, seed: Optional[int] = None) -> None:
        """Replace the random features with a fresh draw (seed None = fresh entropy)."""
        W = orthogonal_random_features(self.num_heads, self.num_features, self.qk_dim, seed)
        self.features.copy_(torch.from_numpy(W))

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, state=None,
                return_state: bool = False):
        if self.redraw and self.training and state is None:
            self.redraw_features()
        q, k, v, mask = self._qkv(x, key_padding_mask)
        acc = _acc(x.dtype)
        W = self.features.to(acc)
        fq, fk = favor_features(q.to(acc), W, True), favor_features(k.to(acc), W, False)
        if mask is not None:
            fk = fk * mask[:, None, :, None].to(acc)
        o, new_state = linear_attention(fq, fk, v.to(acc), self.causal, state, self.config.eps)
        y = self._out(o, x)
        return (y, new_state) if return_state else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_features={self.num_features}, redraw={self.redraw}"


MIXERS = {"gma": GMAMixer, "softmax": SoftmaxAttention, "linear": LinearAttention, "performer": PerformerAttention}


def build(config: MixerConfig) -> nn.Module:
    return MIXERS[config.kind](config)
