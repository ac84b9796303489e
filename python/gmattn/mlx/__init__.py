"""MLX front end of gmattn: the `gma_attention` op and the `GaussianMixtureAttention` layer.

Both run on the torch-free compiled CPU core (no Metal kernels yet); see gmattn.mlx.ops for
what runs where, the dtype policy and the behaviour under MLX transformations.
"""

from .layers import GaussianMixtureAttention
from .ops import gma_attention

__all__ = ["GaussianMixtureAttention", "gma_attention"]
