"""Framework-neutral helpers shared by the torch and MLX mixers."""

from __future__ import annotations

from typing import Optional

import numpy as np

LINEAR_CHUNK = 64
"""Chunk length of the causal linear / performer scan (intra-chunk quadratic, inter-chunk state)."""


def orthogonal_random_features(num_heads: int, num_features: int, dim: int,
                               seed: Optional[int] = None) -> np.ndarray:
    """FAVOR+ projection matrices (num_heads, num_features, dim), float32.

    Rows come in blocks of `dim` mutually orthogonal directions (sign-corrected QR of a Gaussian
    matrix, i.e. Haar-random), each
    scaled by the norm of an independent Gaussian vector, so every row is marginally N(0, I)
    while rows within a block are orthogonal (Choromanski et al. 2021, section 2.4).
    """
    rng = np.random.default_rng(seed)
    out = np.empty((num_heads, num_features, dim), dtype=np.float64)
    for h in range(num_heads):
        blocks = []
        remaining = num_features
        while remaining > 0:
            q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
            # Fixing the signs makes q Haar-distributed; without this the features are biased.
            q = q * np.sign(np.diag(r))
            blocks.append(q.T[: min(dim, remaining)])
            remaining -= dim
        directions = np.concatenate(blocks, axis=0)
        norms = np.linalg.norm(rng.standard_normal((num_features, dim)), axis=1)
        out[h] = directions * norms[:, None]
    return out.astype(np.float32)


def check_input(name: str, shape, d_model: int) -> None:
    if len(shape) != 3 or int(shape[-1]) != d_model:
        raise ValueError(f"{name}: x must have shape (B, N, d_model={d_model}), got {tuple(int(s) for s in shape)}")


def check_mask(name: str, mask_shape, B: int, N: int) -> None:
    if tuple(int(s) for s in mask_shape) != (B, N):
        raise ValueError(
            f"{name}: key_padding_mask must have shape (B, N) = ({B}, {N}) with True = real token, "
            f"got {tuple(int(s) for s in mask_shape)}"
        )


def check_model_args(head: str, num_classes, pooling: str, tie_embeddings: bool) -> None:
    if head not in ("lm", "classification"):
        raise ValueError(f"SequenceModel: head must be 'lm' or 'classification', got {head!r}")
    if head == "classification" and not num_classes:
        raise ValueError("SequenceModel: the classification head needs num_classes")
    if pooling not in ("mean", "last"):
        raise ValueError(f"SequenceModel: pooling must be 'mean' or 'last', got {pooling!r}")
    if tie_embeddings and head != "lm":
        raise ValueError("SequenceModel: tie_embeddings needs the 'lm' head")
