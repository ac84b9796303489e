"""The PyTorch mixers: gma, softmax, linear, performer, ssm behind one calling convention.

    y = mixer(x, key_padding_mask=None)                          # x: (B, N, d_model)
    y, state = mixer(x, key_padding_mask=None, state=state, return_state=True)

`state` carries what the mixer has read so far (see gmattn.mixers.CAUSAL_STATE); feeding a
sequence in pieces with the state handed across equals one run over the whole sequence.
`key_padding_mask` (B, N) bool, True = real token: masked keys are never read.

    y = mixer(x, cu_seqlens=offsets)                             # x: (1, N, d_model), S packed sequences

`cu_seqlens` (S + 1 offsets from 0 to N) packs S sequences into the one row of x: each is mixed on
its own, and states have a row per sequence. The GMA layer runs them in one op call; the baseline
kinds run each sequence's slice on its own (gmattn.mixers._common.run_mixer).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..torch.layers import GaussianMixtureAttention
from ._common import LINEAR_CHUNK, SSM_CHUNK, SSM_NORM_EPS, ArrayOps, Exchange, check_call, gma_layer_arguments
from ._common import init_projected_mixer, init_ssm_mixer, orthogonal_random_features, run_mixer
from .config import MixerConfig


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


TORCH_OPS = ArrayOps(concat=lambda arrays, axis: torch.cat(arrays, dim=axis),
                     zeros=lambda like, shape: like.new_zeros(shape))


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
# Selective state-space scan of the "ssm" kind (Mamba-2's SSD, scalar decay per head)
# ----------------------------------------------------------------------------------------------
def segment_sums(a: Tensor) -> Tensor:
    """a (..., T) -> (..., T, T) with [i, j] = a[j+1] + ... + a[i] for j <= i (0 on the diagonal) and
    -inf above it, so exp() of it is the decay from position j to i. Each entry is summed directly,
    not as a difference of two cumulative sums, which would lose the small ones in float32."""
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    rows = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~ones.tril(-1), 0.0)
    return rows.cumsum(-2).masked_fill(~ones.tril(0), float("-inf"))


def decayed_scan(g: Tensor, s: Tensor, h0: Tensor, group: int = SSM_CHUNK) -> Tensor:
    """Every h[c] of h[c] = exp(g[c]) h[c-1] + s[c], h[-1] = h0: g (..., n), s (..., n, F), h0 (..., F)
    -> (..., n, F). Up to `group` steps it is one product with the decay matrix; longer scans run
    within groups of that length, and the groups' end states scan the same way one level up, so the
    cost is O(n group F), not O(n^2 F)."""
    n = g.shape[-1]
    if n <= group:
        return torch.exp(segment_sums(g)) @ s + torch.exp(g.cumsum(-1)).unsqueeze(-1) * h0.unsqueeze(-2)
    pad = (-n) % group  # zero steps at the end: no decay, no input
    g, s = F.pad(g, (0, pad)), F.pad(s, (0, 0, 0, pad))
    m = (n + pad) // group
    g = g.reshape(*g.shape[:-1], m, group)
    s = s.reshape(*s.shape[:-2], m, group, s.shape[-1])
    local = torch.exp(segment_sums(g)) @ s  # each group's scan from a zero state
    ends = decayed_scan(g.sum(-1), local[..., -1, :], h0, group)
    entering = torch.cat([h0.unsqueeze(-2), ends[..., :-1, :]], dim=-2)
    h = local + torch.exp(g.cumsum(-1)).unsqueeze(-1) * entering.unsqueeze(-2)
    return h.flatten(-3, -2)[..., :n, :]


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Optional[Tensor] = None,
                   diagonal: bool = True, chunk: int = SSM_CHUNK):
    """The selective state-space recurrence, per batch row and head, as SSD's chunked scan:

        h[t] = exp(dt[t] A) h[t-1] + dt[t] x[t] B[t]^T        (P x S)
        y[t] = h[t] C[t]                      (diagonal=True)
        y[t] = exp(dt[t] A) h[t-1] C[t]       (diagonal=False: a token does not read its own write)

    x (Bt, N, H, P); dt (Bt, N, H) >= 0 (dt = 0 leaves the state as it is: masked tokens); A (H,) < 0;
    B, C (Bt, N, S), shared by the heads; initial_state (Bt, H, P, S) or None (zeros). Inside chunks
    of `chunk` tokens the output is the quadratic form sum_j (C[i] . B[j]) exp(A dt[j+1..i]) dt[j] x[j];
    the chunks' states run through `decayed_scan`. Returns y (Bt, N, H, P) and the final state.
    `selective_scan_sequential` is the step-by-step reference.
    """
    Bt, N, H, P = x.shape
    S = B.shape[-1]
    L = max(1, min(chunk, N))
    pad = (-N) % L
    if pad:
        x, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    n = (N + pad) // L
    a = (dt * A).transpose(1, 2).reshape(Bt, H, n, L)  # log decay of each step
    xdt = (x * dt.unsqueeze(-1)).permute(0, 2, 1, 3).reshape(Bt, H, n, L, P)
    Bc, Cc = B.reshape(Bt, 1, n, L, S), C.reshape(Bt, 1, n, L, S)
    seg = segment_sums(a)
    decay = torch.exp(seg) if diagonal else torch.exp(seg).tril(-1)
    y = ((Cc @ Bc.transpose(-1, -2)) * decay) @ xdt  # within the chunk
    writes = (xdt * torch.exp(seg[..., -1, :]).unsqueeze(-1)).transpose(-1, -2) @ Bc  # (Bt, H, n, P, S)
    h0 = x.new_zeros(Bt, H, P * S) if initial_state is None else initial_state.to(x.dtype).reshape(Bt, H, P * S)
    ends = decayed_scan(a.sum(-1), writes.flatten(-2), h0)  # state after each chunk
    entering = torch.cat([h0.unsqueeze(2), ends[:, :, :-1]], dim=2).reshape(Bt, H, n, P, S)
    y = y + torch.exp(a.cumsum(-1)).unsqueeze(-1) * (Cc @ entering.transpose(-1, -2))  # from earlier chunks
    y = y.reshape(Bt, H, n * L, P)[:, :, :N].transpose(1, 2)
    return y, ends[:, :, -1].reshape(Bt, H, P, S)


def selective_scan_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              initial_state: Optional[Tensor] = None, diagonal: bool = True):
    """`selective_scan` one step at a time (the reference of the chunked scan; same arguments)."""
    Bt, N, H, P = x.shape
    h = x.new_zeros(Bt, H, P, B.shape[-1]) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(N):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # (Bt, H, 1, 1)
        write = (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * B[:, t, None, None, :]
        if diagonal:
            h = decay * h + write
            ys.append(h @ C[:, t, None, :, None])
        else:
            ys.append((decay * h) @ C[:, t, None, :, None])
            h = decay * h + write
    return torch.stack(ys, 1).squeeze(-1), h


def ssm_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, causal: bool,
             initial_state: Optional[Tensor] = None, scan=selective_scan):
    """Causal: the forward scan. Bidirectional: the forward scan plus a reverse scan (the forward
    scan of the reversed sequence) in which a token does not read its own write, so every pair
    (i, j) is counted once: y[i] = sum_j (C[i] . B[j]) exp(A dt between them) dt[j] x[j] over all j,
    the decay running over the steps after j up to i (j <= i) or from i up to before j (j > i).
    The state is the forward scan's (the reverse scan starts from zeros). `scan` is
    selective_scan or selective_scan_sequential."""
    y, h = scan(x, dt, A, B, C, initial_state)
    if not causal:
        y_rev, _ = scan(x.flip(1), dt.flip(1), A, B.flip(1), C.flip(1), diagonal=False)
        y = y + y_rev.flip(1)
    return y, h


def causal_conv(u: Tensor, tail: Tensor, weight: Tensor, bias: Tensor):
    """Depthwise causal convolution out[t] = bias + sum_w weight[:, w] u[t - W + 1 + w] (PyTorch
    Conv1d's weight layout (C, 1, W) without the middle axis), reading `tail` (B, W - 1, C), the
    inputs before u (B, N, C). Returns out and the new tail (the last W - 1 inputs)."""
    W = weight.shape[1]
    full = torch.cat([tail, u], dim=1)
    N = u.shape[1]
    out = bias + sum(full[:, w: w + N] * weight[:, w] for w in range(W))
    return out, full[:, N:]


# ----------------------------------------------------------------------------------------------
# Mixers
# ----------------------------------------------------------------------------------------------
class GMAMixer(Exchange, GaussianMixtureAttention):
    """kind "gma": gmattn.torch.GaussianMixtureAttention built from a MixerConfig."""

    def __init__(self, config: MixerConfig):
        GaussianMixtureAttention.__init__(self, **gma_layer_arguments(config))
        self.config = config


class _PackedCalls:
    """The calling convention of the baseline kinds: forward(x, key_padding_mask=None, state=None,
    return_state=False, cu_seqlens=None) runs the kind's `unpacked` call, on packed sequences
    one sequence at a time (run_mixer)."""

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, state=None, return_state: bool = False,
                cu_seqlens: Optional[Tensor] = None):
        return run_mixer(self, TORCH_OPS, "torch", x, key_padding_mask, state, return_state, cu_seqlens)


class _ProjectedMixer(Exchange, _PackedCalls, nn.Module):
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

    def unpacked(self, x: Tensor, key_padding_mask: Optional[Tensor], state, return_state: bool):
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

    def unpacked(self, x: Tensor, key_padding_mask: Optional[Tensor], state, return_state: bool):
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

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, state=None, return_state: bool = False,
                cu_seqlens: Optional[Tensor] = None):
        if self.redraw and self.training and state is None:
            self.redraw_features()  # once per call, also for packed sequences
        return super().forward(x, key_padding_mask, state, return_state, cu_seqlens)

    def unpacked(self, x: Tensor, key_padding_mask: Optional[Tensor], state, return_state: bool):
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


class SelectiveSSM(Exchange, _PackedCalls, nn.Module):
    """kind "ssm": a Mamba-2 style selective state-space mixer (Dao & Gu 2024).

    Per token: z, x (H P), B, C (S, shared by the heads) and dt (H) are projections of the input;
    x, B and C pass a causal depthwise convolution of width W (conv_width; 0: none) and SiLU; the
    step size is dt = softplus(dt + dt_bias), zero on masked tokens (which then neither write nor
    decay the state; their convolution input is zero too). Each head h scans
    h[t] = exp(dt[t] A_h) h[t-1] + dt[t] x[t] B[t]^T, y[t] = h[t] C[t] + D_h x[t], with the scalar
    decay A_h = -exp(A_log_h) (`selective_scan`, SSD's chunked form); bidirectional adds a reverse
    scan (`ssm_scan`). The output is out_proj(RMSNorm(y * silu(z)) * norm_weight).

    The state is (h (B, H, P, S), conv (B, W - 1, H P + 2 S)): the scan's state and the last W - 1
    convolution inputs, float32 (float64 for float64 inputs). A bidirectional mixer's forward scan
    starts from a passed state; its reverse scan always starts from zeros.
    """

    def __init__(self, config: MixerConfig):
        super().__init__()
        init_ssm_mixer(self, nn.Linear, lambda value: nn.Parameter(torch.from_numpy(value)), config,
                       lambda shape: torch.rand(shape, dtype=torch.float64).numpy())

    def unpacked(self, x: Tensor, key_padding_mask: Optional[Tensor], state, return_state: bool):
        B, N = check_call(type(self).__name__, self.config.d_model, x, key_padding_mask, framework="torch")
        H, P, S = self.num_heads, self.head_dim, self.state_dim
        acc = _acc(x.dtype)
        u = torch.cat([self.x_proj(x), self.B_proj(x), self.C_proj(x)], dim=-1).to(acc)
        dt = F.softplus(self.dt_proj(x).to(acc) + self.dt_bias.to(acc))
        if key_padding_mask is not None:
            real = key_padding_mask.to(device=x.device, dtype=torch.bool).to(acc).unsqueeze(-1)
            u, dt = u * real, dt * real
        h0, tail = (None, u.new_zeros(B, max(self.conv_width - 1, 0), u.shape[-1])) if state is None else state
        if self.conv_width:
            u, tail = causal_conv(u, tail.to(acc), self.conv_weight.to(acc), self.conv_bias.to(acc))
        xs, Bs, Cs = F.silu(u).split([H * P, S, S], dim=-1)
        xs = xs.reshape(B, N, H, P)
        y, h = ssm_scan(xs, dt, -torch.exp(self.A_log.to(acc)), Bs, Cs, self.causal, h0)
        y = (y + self.D.to(acc)[:, None] * xs).reshape(B, N, H * P)
        g = y * F.silu(self.z_proj(x).to(acc))
        g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + SSM_NORM_EPS) * self.norm_weight.to(acc)
        out = self.out_proj(g.to(x.dtype))
        return (out, (h, tail)) if return_state else out

    def extra_repr(self) -> str:
        return f"kind='ssm', d_model={self.config.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, " \
               f"state_dim={self.state_dim}, conv_width={self.conv_width}, causal={self.causal}"


MIXERS = {"gma": GMAMixer, "softmax": SoftmaxAttention, "linear": LinearAttention, "performer": PerformerAttention,
          "ssm": SelectiveSSM}


def build(config: MixerConfig) -> nn.Module:
    return MIXERS[config.kind](config)
