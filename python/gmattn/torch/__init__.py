"""PyTorch front end of gmattn: the `gma_attention` op and the `GaussianMixtureAttention` layer."""

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "gmattn.torch needs PyTorch (>= 2.4), which is not installed: pip install 'gmattn[torch]' "
        "(or any torch >= 2.4). The NumPy path, gmattn.gma_attention on numpy arrays, works without it."
    ) from exc

from .layers import GaussianMixtureAttention, initial_variance
from .ops import gma_attention

__all__ = ["GaussianMixtureAttention", "gma_attention", "initial_variance"]
