"""Settings of a GMA layer that MixerConfig does not expose, applied to a built torch model for
the ablations: variance and mean initialisation, a fixed uniform prior, normalised routing
coordinates. (K and routing_dim are MixerConfig fields; the learning-rate multiplier of mu, omega
and alpha is a parameter group of the optimiser, see training.parameter_groups.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .._init import ROUTING_VARIANCE, initial_variance

MEAN_INITS = ("random", "data")
PRIORS = ("learned", "uniform")


@dataclass(frozen=True)
class GMAOptions:
    """variance_scale: initial sigma^2 = variance_scale * the library's initial_variance.
    mean_scale: initial mu ~ N(0, mean_scale^2 * ROUTING_VARIANCE) (mean_init "random").
    mean_init: "random" (the library's draw) or "data" (mu = routing keys of K random tokens of a
        batch, per layer and head, as a k-means++-free data initialisation).
    prior: "learned" (alpha trained) or "uniform" (alpha fixed at zero).
    mixture_lr_mult: learning rate of mu, omega, alpha relative to the rest.
    routing_norm: queries and keys are RMS-normalised per head to variance ROUTING_VARIANCE
        before routing (a fixed scale, so the initial means and variances fit them).
    """

    variance_scale: float = 1.0
    mean_scale: float = 1.0
    mean_init: str = "random"
    prior: str = "learned"
    mixture_lr_mult: float = 1.0
    routing_norm: bool = False

    def __post_init__(self) -> None:
        if self.mean_init not in MEAN_INITS:
            raise ValueError(f"GMAOptions: mean_init must be one of {MEAN_INITS}, got {self.mean_init!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"GMAOptions: prior must be one of {PRIORS}, got {self.prior!r}")
        for name in ("variance_scale", "mean_scale", "mixture_lr_mult"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GMAOptions: {name} must be > 0, got {getattr(self, name)!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def gma_layers(model) -> List[Any]:
    from ..torch import GaussianMixtureAttention

    return [m for m in model.modules() if isinstance(m, GaussianMixtureAttention)]


def _rms_normaliser(num_heads: int):
    def hook(module, inputs, output):
        shape = output.shape
        x = output.reshape(*shape[:-1], num_heads, shape[-1] // num_heads)
        x = x * (ROUTING_VARIANCE / (x.pow(2).mean(-1, keepdim=True) + 1e-6)).sqrt()
        return x.reshape(shape)

    return hook


def apply_gma_options(model, options: GMAOptions, data_batch=None) -> None:
    """Re-initialises and modifies every GMA layer of `model` per `options` (in place).
    `data_batch` (tokens, targets, mask) is needed for mean_init="data"."""
    import torch

    layers = gma_layers(model)
    for layer in layers:
        if options.routing_norm:
            layer.q_proj.register_forward_hook(_rms_normaliser(layer.num_heads))
            layer.k_proj.register_forward_hook(_rms_normaliser(layer.num_heads))
        with torch.no_grad():
            sigma2 = options.variance_scale * initial_variance(ROUTING_VARIANCE, layer.routing_dim)
            layer.omega.fill_(math.log(math.expm1(sigma2 - layer.sigma_eps)))
            layer.mu.mul_(options.mean_scale)
            if options.prior == "uniform":
                layer.alpha.zero_()
        layer.alpha.requires_grad_(options.prior == "learned")
    if options.mean_init == "data":
        if data_batch is None:
            raise ValueError("apply_gma_options: mean_init='data' needs data_batch")
        _means_from_keys(model, layers, data_batch)


def _means_from_keys(model, layers, data_batch) -> None:
    """mu[h, k] = the routing key of a random token (distinct per component) of data_batch."""
    import torch

    captured: Dict[int, torch.Tensor] = {}
    handles = [layer.k_proj.register_forward_hook(
        lambda m, i, out, idx=idx: captured.__setitem__(idx, out.detach())) for idx, layer in enumerate(layers)]
    tokens, _, mask = data_batch
    with torch.no_grad():
        model(tokens) if mask is None else model(tokens, key_padding_mask=mask)
    for h in handles:
        h.remove()
    generator = torch.Generator().manual_seed(0)
    for idx, layer in enumerate(layers):
        H, K, D = layer.mu.shape
        keys = captured[idx].reshape(-1, H, D)
        if mask is not None:
            keys = keys[mask.reshape(-1)]
        if keys.shape[0] < K:
            raise ValueError(f"mean_init='data': the batch has {keys.shape[0]} tokens, fewer than K={K}")
        with torch.no_grad():
            for h in range(H):
                pick = torch.randperm(keys.shape[0], generator=generator)[:K]
                layer.mu[h].copy_(keys[pick, h])
