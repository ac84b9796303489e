"""MLX front end of gmattn: the `gma_attention` op and the `GaussianMixtureAttention` layer.

Two implementations: the MLX-native one (MLX operations with a hand-written vjp: lazy, on any
device, under mx.compile / mx.vmap / mx.grad) and the compiled CPU core. The default "auto" takes
the native one on a GPU and under mx.compile / mx.vmap, the core for eager CPU calls;
`set_backend(...)`, ``backend=...`` or ``GMATTN_MLX_BACKEND`` force one. See
gmattn.mlx.ops for what runs where, the dtype policy and the behaviour under MLX transformations.
"""

from .layers import GaussianMixtureAttention
from .ops import BACKENDS, get_backend, gma_attention, set_backend

__all__ = ["BACKENDS", "GaussianMixtureAttention", "get_backend", "gma_attention", "set_backend"]
