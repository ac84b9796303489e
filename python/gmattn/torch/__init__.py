"""PyTorch front end of gmattn: the `gma_attention` op and the `GaussianMixtureAttention` layer."""

from .layers import GaussianMixtureAttention, initial_variance
from .ops import gma_attention

__all__ = ["GaussianMixtureAttention", "gma_attention", "initial_variance"]
