"""Framework-neutral parts of the torch and MLX GaussianMixtureAttention layers (imports no framework).

Both layers take the same constructor arguments, refuse the same mistakes in the same words,
build the same projections and describe themselves alike; weights move between them only
because the parameter names and shapes agree, so those rules live here once. The projection
table also serves the baseline mixers of gmattn.mixers, which exchange weights the same way.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

LAYER = "GaussianMixtureAttention"
"""The layers' name in their error messages."""


def set_hyperparameters(layer: Any, d_model: int, num_heads: int, num_components: int, head_dim: Optional[int],
                        routing_dim: Optional[int], causal: bool, eps: float, sigma_eps: float) -> None:
    """Checks the sizes, fills in the defaults (head_dim = d_model // num_heads, routing_dim =
    head_dim) and sets them, with causal, eps and sigma_eps, as attributes of `layer`."""
    if d_model < 1 or num_heads < 1 or num_components < 1:
        raise ValueError(
            f"{LAYER}: d_model, num_heads and num_components must be >= 1, got "
            f"{d_model}, {num_heads}, {num_components}"
        )
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(
                f"{LAYER}: d_model={d_model} is not divisible by num_heads={num_heads}; pass head_dim explicitly"
            )
        head_dim = d_model // num_heads
    routing_dim = head_dim if routing_dim is None else routing_dim
    if head_dim < 1 or routing_dim < 1:
        raise ValueError(f"{LAYER}: head_dim and routing_dim must be >= 1, got {head_dim}, {routing_dim}")
    layer.d_model, layer.num_heads, layer.num_components = d_model, num_heads, num_components
    layer.head_dim, layer.routing_dim = head_dim, routing_dim
    layer.causal, layer.eps, layer.sigma_eps = causal, eps, sigma_eps


def projections(d_model: int, num_heads: int, qk_dim: int, v_dim: int) -> Dict[str, Tuple[int, int]]:
    """(in_features, out_features) of the q, k, v and out projections (nn.Linear), by attribute name,
    in the order they are created (which fixes torch's state_dict order)."""
    return {
        "q_proj": (d_model, num_heads * qk_dim),
        "k_proj": (d_model, num_heads * qk_dim),
        "v_proj": (d_model, num_heads * v_dim),
        "out_proj": (num_heads * v_dim, d_model),
    }


def describe(layer: Any) -> str:
    """The layer's repr arguments (torch's extra_repr, MLX's _extra_repr)."""
    return (
        f"d_model={layer.d_model}, num_heads={layer.num_heads}, num_components={layer.num_components}, "
        f"head_dim={layer.head_dim}, routing_dim={layer.routing_dim}, causal={layer.causal}"
    )
