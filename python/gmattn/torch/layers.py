"""GaussianMixtureAttention as a torch.nn.Module."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _checks, _layer_spec
from .._init import ROUTING_VARIANCE, initial_omega, initial_variance  # noqa: F401 (re-exported)
from .ops import gma_attention


class GaussianMixtureAttention(nn.Module):
    """Multi-head Gaussian Mixture Attention layer: (B, N, d_model) -> (B, N, d_model).

    Args:
        d_model: model width.
        num_heads: H.
        num_components: K, the mixture components (memory slots) per head.
        head_dim: value width per head Dv (default d_model // num_heads).
        routing_dim: query/key width per head D (default head_dim).
        causal: each position reads only keys at or before it.
        eps, sigma_eps: see gmattn.gma_attention.
        bias: bias in the q/k/v/out projections.

    Parameters `mu` (H, K, D), `omega` (H, K, D) and `alpha` (H, K) are the component means,
    raw variances (sigma^2 = softplus(omega) + sigma_eps) and prior logits.

    Initialisation: projections use nn.Linear's default, which gives routing coordinates of
    variance about 1/3 for unit-variance inputs (as after a LayerNorm). Means are drawn from
    N(0, 1/3) so components sit where queries and keys are; variances follow
    `initial_variance` (soft, non-collapsed routing); prior logits start at zero (uniform prior).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_components: int,
        head_dim: Optional[int] = None,
        routing_dim: Optional[int] = None,
        causal: bool = False,
        eps: float = 1e-6,
        sigma_eps: float = 1e-4,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _layer_spec.set_hyperparameters(self, d_model, num_heads, num_components, head_dim, routing_dim, causal, eps,
                                        sigma_eps)
        H, K, D, Dv = num_heads, num_components, self.routing_dim, self.head_dim
        factory = {"device": device, "dtype": dtype}
        # q_proj, k_proj, v_proj, out_proj
        for name, (n_in, n_out) in _layer_spec.projections(d_model, H, D, Dv).items():
            setattr(self, name, nn.Linear(n_in, n_out, bias=bias, **factory))
        self.mu = nn.Parameter(torch.empty(H, K, D, **factory))
        self.omega = nn.Parameter(torch.empty(H, K, D, **factory))
        self.alpha = nn.Parameter(torch.empty(H, K, **factory))
        self.reset_mixture_parameters()
        # Set by gmattn.torch.distributed.context_parallel: this layer's input is one rank's shard.
        self.context_parallel = False
        self.context_parallel_group = None

    ROUTING_VARIANCE = ROUTING_VARIANCE

    @torch.no_grad()
    def reset_mixture_parameters(self) -> None:
        self.mu.normal_(0.0, math.sqrt(self.ROUTING_VARIANCE))
        self.omega.fill_(initial_omega(self.ROUTING_VARIANCE, self.routing_dim, self.sigma_eps))
        self.alpha.zero_()

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        state: Optional[Tuple[Tensor, Tensor]] = None,
        return_state: bool = False,
        cu_seqlens: Optional[Tensor] = None,
    ):
        """x (B, N, d_model) -> (B, N, d_model), or (y, final state) with return_state.

        cu_seqlens: packed sequences, S + 1 int32/int64 offsets from 0 to N into the one row of x
        (B = 1): each sequence is attended on its own; `state` and the returned state then have a
        row per sequence (S in place of B). Passed to gmattn.gma_attention, which checks it.
        """
        _checks.require_module_input(type(self).__name__, "x", x, "torch")
        _checks.check_input(_layer_spec.LAYER, x.shape, self.d_model)
        B, N, _ = x.shape
        H, D, Dv = self.num_heads, self.routing_dim, self.head_dim
        q = self.q_proj(x).view(B, N, H, D)
        k = self.k_proj(x).view(B, N, H, D)
        v = self.v_proj(x).view(B, N, H, Dv)
        if self.context_parallel:
            if state is not None or return_state:
                raise ValueError("GaussianMixtureAttention: a context-parallel layer takes no state and returns none "
                                 "(the ranks' states are combined inside the call)")
            if cu_seqlens is not None:
                raise ValueError("GaussianMixtureAttention: a context-parallel layer takes no cu_seqlens (its input "
                                 "is one rank's shard of one sequence)")
            from .distributed import gma_attention as context_parallel_gma

            out = context_parallel_gma(q, k, v, self.mu, self.omega, self.alpha, causal=self.causal,
                                       group=self.context_parallel_group, key_padding_mask=key_padding_mask,
                                       eps=self.eps, sigma_eps=self.sigma_eps)
            return self.out_proj(out.reshape(B, N, H * Dv))
        result = gma_attention(
            q, k, v, self.mu, self.omega, self.alpha, causal=self.causal, key_padding_mask=key_padding_mask,
            initial_state=state, output_final_state=return_state, eps=self.eps, sigma_eps=self.sigma_eps,
            cu_seqlens=cu_seqlens,
        )
        out, new_state = result if return_state else (result, None)
        y = self.out_proj(out.reshape(B, N, H * Dv))
        return (y, new_state) if return_state else y

    def extra_repr(self) -> str:
        return _layer_spec.describe(self)
