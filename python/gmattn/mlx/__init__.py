"""MLX front end of gmattn: the `gma_attention` op and the `GaussianMixtureAttention` layer.

By default both run the MLX-native implementation (MLX operations with a hand-written vjp: lazy,
on any device, under mx.compile / mx.vmap / mx.grad); `set_backend("core")` (or
``backend="core"``, or ``GMATTN_MLX_BACKEND=core``) selects the compiled CPU core instead. See
gmattn.mlx.ops for what runs where, the dtype policy and the behaviour under MLX transformations.
"""

from .layers import GaussianMixtureAttention
from .ops import BACKENDS, get_backend, gma_attention, set_backend

__all__ = ["BACKENDS", "GaussianMixtureAttention", "get_backend", "gma_attention", "set_backend"]
