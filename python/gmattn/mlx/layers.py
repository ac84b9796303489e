"""GaussianMixtureAttention as an mlx.nn.Module (mirrors gmattn.torch.GaussianMixtureAttention)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .. import _checks, _init, _layer_spec
from .ops import gma_attention


class GaussianMixtureAttention(nn.Module):
    """Multi-head Gaussian Mixture Attention layer: (B, N, d_model) -> (B, N, d_model).

    Same constructor, call arguments, parameter names and initialisation rule as
    ``gmattn.torch.GaussianMixtureAttention``, so weights move between the two unchanged:
    ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear``, weight (out, in) as in torch),
    ``mu`` (H, K, D), ``omega`` (H, K, D), ``alpha`` (H, K). A torch ``state_dict()`` converted to
    mx.arrays loads with ``layer.load_weights(list(state.items()))``.

    Args:
        d_model: model width.
        num_heads: H.
        num_components: K, the mixture components (memory slots) per head.
        head_dim: value width per head Dv (default d_model // num_heads).
        routing_dim: query/key width per head D (default head_dim).
        causal: each position reads only keys at or before it.
        eps, sigma_eps: see gmattn.gma_attention.
        bias: bias in the q/k/v/out projections.
        device: must be None (MLX arrays have no device; accepted for signature parity with torch).
        dtype: parameter dtype (an mx.Dtype); default float32.

    Initialisation: projections use nn.Linear's default (uniform in +-1/sqrt(fan_in), the same
    distribution as torch's default), means from N(0, 1/3), variances from
    ``gmattn._init.initial_variance``, prior logits zero.

    The op runs on gmattn.mlx's backend (see gmattn.mlx.ops): by default the MLX-native one, on
    the device and stream of the caller's code, so the layer works inside ``mx.compile`` (a
    compiled training step with ``nn.value_and_grad``), ``mx.vmap`` and on the GPU. With the
    "core" backend (the compiled CPU core) the op runs on the CPU and, in training mode
    (``layer.train()``, the default), keeps the responsibilities for the backward pass; in
    ``layer.eval()`` mode it stores nothing (a later gradient recomputes them).
    """

    ROUTING_VARIANCE = _init.ROUTING_VARIANCE

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
        if device is not None:
            raise ValueError(
                "GaussianMixtureAttention (MLX): 'device' must be None; MLX arrays have no device "
                "(use mx.set_default_device or streams)."
            )
        H, K, D, Dv = num_heads, num_components, self.routing_dim, self.head_dim
        # q_proj, k_proj, v_proj, out_proj
        for name, (n_in, n_out) in _layer_spec.projections(d_model, H, D, Dv).items():
            setattr(self, name, nn.Linear(n_in, n_out, bias=bias))
        self.mu = mx.zeros((H, K, D))
        self.omega = mx.zeros((H, K, D))
        self.alpha = mx.zeros((H, K))
        self.reset_mixture_parameters()
        if dtype is not None:
            self.set_dtype(dtype)

    def reset_mixture_parameters(self) -> None:
        dtype = self.mu.dtype
        H, K, D = self.num_heads, self.num_components, self.routing_dim
        self.mu = (mx.random.normal((H, K, D)) * math.sqrt(self.ROUTING_VARIANCE)).astype(dtype)
        self.omega = mx.full((H, K, D), _init.initial_omega(self.ROUTING_VARIANCE, D, self.sigma_eps), dtype=dtype)
        self.alpha = mx.zeros((H, K), dtype=dtype)

    def __call__(
        self,
        x: mx.array,
        key_padding_mask: Optional[mx.array] = None,
        state: Optional[Tuple[mx.array, mx.array]] = None,
        return_state: bool = False,
        cu_seqlens: Optional[mx.array] = None,
    ):
        """x (B, N, d_model) -> (B, N, d_model), or (y, final state) with return_state.

        cu_seqlens: packed sequences, as for gmattn.torch.GaussianMixtureAttention (states with a
        row per sequence). The op reads the offsets on the host, so a call with them cannot be
        traced by mx.compile.
        """
        _checks.require_module_input(type(self).__name__, "x", x, "mlx")
        _checks.check_input(_layer_spec.LAYER, x.shape, self.d_model)
        B, N, _ = x.shape
        H, D, Dv = self.num_heads, self.routing_dim, self.head_dim
        q = self.q_proj(x).reshape(B, N, H, D)
        k = self.k_proj(x).reshape(B, N, H, D)
        v = self.v_proj(x).reshape(B, N, H, Dv)
        result = gma_attention(
            q, k, v, self.mu, self.omega, self.alpha, causal=self.causal, key_padding_mask=key_padding_mask,
            initial_state=state, output_final_state=return_state, eps=self.eps, sigma_eps=self.sigma_eps,
            save_for_backward=self.training, cu_seqlens=cu_seqlens,
        )
        out, new_state = result if return_state else (result, None)
        y = self.out_proj(out.reshape(B, N, H * Dv))
        return (y, new_state) if return_state else y

    def _extra_repr(self) -> str:
        return _layer_spec.describe(self)
