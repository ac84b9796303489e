"""Framework-neutral initialisation rules shared by the torch and MLX layers (imports no framework)."""

from __future__ import annotations

import math

__all__ = ["ROUTING_VARIANCE", "initial_variance", "initial_omega"]

# Variance of the routing coordinates (q, k) at initialisation: nn.Linear's default init on
# unit-variance inputs gives about 1/3, in torch and in MLX alike.
ROUTING_VARIANCE = 1.0 / 3.0


def initial_variance(routing_variance: float, routing_dim: int) -> float:
    """Initial sigma^2 of every component, chosen so routing starts soft but informative.

    For x and mu drawn with per-dimension variance v, the squared distance ||x - mu_k||^2 varies
    over components with standard deviation about v * sqrt(6 D). Dividing by 2 sigma^2 gives the
    spread of the log-densities; sigma^2 = 0.5 v sqrt(6 D) makes that spread about one nat: no
    component starts dead (responsibilities near 0 everywhere) and none dominates.
    """
    return 0.5 * routing_variance * math.sqrt(6.0 * routing_dim)


def initial_omega(routing_variance: float, routing_dim: int, sigma_eps: float) -> float:
    """The raw variance omega with softplus(omega) + sigma_eps = initial_variance(...)."""
    sigma2 = initial_variance(routing_variance, routing_dim)
    return math.log(math.expm1(sigma2 - sigma_eps))  # softplus^-1
