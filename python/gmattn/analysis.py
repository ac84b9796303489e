"""What Gaussian Mixture Attention routes where: responsibilities, their statistics, their stability.

    from gmattn import analysis
    gammas = analysis.capture_responsibilities(model, tokens)      # {block: {"q": (B,N,H,K), "k": ...}}
    stats = analysis.routing_stats(gammas[0]["k"], labels=classes)  # per head: usage, entropy, nmi
    moved = analysis.routing_stability(layer, x, noise_scale=0.05)  # per head: mean TV distance
    analysis.plot_responsibilities(gammas[0]["q"], text, path="routing.png")

Everything here works for models and layers of both frameworks (PyTorch and MLX) and returns
NumPy arrays. Responsibilities are computed in float64 by `gmattn.reference.responsibilities`
(so the analysis needs torch installed, also for MLX models) from the q / k projections the layer
itself computes. Rows of padded tokens (key_padding_mask False) are NaN, and the statistics skip
them. The plots need matplotlib (an optional dependency).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .mixers import weights as _weights
from .mixers._common import observing_mixer_inputs

__all__ = ["capture_mixer_inputs", "capture_responsibilities", "routing_stats", "routing_stability",
           "plot_responsibilities", "plot_component_usage", "plot_usage_matrix"]

_ROWS_PER_CALL = 1 << 22
"""Rows times K times D of one reference call (its (B, N, H, K, D) temporary: 32 MiB in float64)."""


# ----------------------------------------------------------------------------------------------
# Frameworks
# ----------------------------------------------------------------------------------------------
def _is_gma_layer(obj: Any) -> bool:
    """A GaussianMixtureAttention layer of either framework (the "gma" mixers are ones too)."""
    for name in ("gmattn.torch.layers", "gmattn.mlx.layers"):
        module = sys.modules.get(name)
        if module is not None and isinstance(obj, module.GaussianMixtureAttention):
            return True
    return False


def _is_torch_array(a: Any) -> bool:
    return type(a).__module__.startswith("torch")


def _to_numpy(a: Any) -> np.ndarray:
    """A torch tensor, MLX array or NumPy array as a float64 NumPy array."""
    if _is_torch_array(a):
        return a.detach().cpu().double().numpy()
    if type(a).__module__.startswith("mlx"):
        import mlx.core as mx

        return np.array(a.astype(mx.float32) if a.dtype in (mx.bfloat16, mx.float16) else a).astype(np.float64)
    return np.asarray(a, dtype=np.float64)


def _to_framework(like: Any, a: np.ndarray) -> Any:
    """a as an array of `like`'s framework, dtype and device."""
    if _is_torch_array(like):
        import torch

        return torch.from_numpy(a).to(device=like.device, dtype=like.dtype)
    import mlx.core as mx

    return mx.array(a).astype(like.dtype)


class _InferenceMode:
    """Evaluation mode (no dropout) and, for torch, no autograd graph; the modes are restored after."""

    def __init__(self, module: Any):
        self.module = module

    def __enter__(self):
        self.training = bool(self.module.training)
        self.module.eval()
        if _weights._is_torch(self.module):
            import torch

            self.no_grad = torch.no_grad()
            self.no_grad.__enter__()
        return self

    def __exit__(self, *exc):
        if _weights._is_torch(self.module):
            self.no_grad.__exit__(*exc)
        self.module.train(self.training)
        return False


# ----------------------------------------------------------------------------------------------
# Capturing responsibilities
# ----------------------------------------------------------------------------------------------
def _gma_blocks(model: Any) -> Dict[int, Any]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(
            "gmattn.analysis: expected a SequenceModel (gmattn.build_model) or a GaussianMixtureAttention layer "
            f"(torch or MLX), got {type(model).__name__}")
    found = {i: block for i, block in enumerate(blocks) if _is_gma_layer(block.mixer)}
    if not found:
        kinds = sorted({type(block.mixer).__name__ for block in blocks})
        raise ValueError(f"gmattn.analysis: the model has no GMA blocks (its mixers are {kinds})")
    return found


def capture_mixer_inputs(model: Any, tokens: Any, key_padding_mask: Optional[Any] = None) -> Dict[int, Any]:
    """{block index: the input (B, N, d_model) of that block's GMA mixer} for one forward of a
    SequenceModel (either framework) on `tokens` (B, N); the arrays are the model's framework's.
    The model runs in evaluation mode (its mode is restored after). Only blocks whose mixer is GMA
    are listed; `routing_stability(model.blocks[i].mixer, inputs[i], ...)` probes one of them."""
    blocks = _gma_blocks(model)
    seen: Dict[int, Any] = {}
    index = {id(block): i for i, block in blocks.items()}

    def observe(block, u):
        if id(block) in index:
            seen[index[id(block)]] = u

    with _InferenceMode(model), observing_mixer_inputs(observe):
        model(tokens, key_padding_mask=key_padding_mask)
    return {i: seen[i] for i in sorted(seen)}


def _layer_responsibilities(layer: Any, x: Any, key_padding_mask: Optional[Any]) -> Dict[str, np.ndarray]:
    """{"q": gamma, "k": gamma} (B, N, H, K) float64 of a GMA layer on its input x (B, N, d_model)."""
    import torch

    from . import reference

    shape = tuple(int(s) for s in x.shape)
    if len(shape) != 3 or shape[-1] != layer.d_model:
        raise ValueError(f"gmattn.analysis: x must have shape (B, N, d_model={layer.d_model}), got {shape}")
    B, N, _ = shape
    H, K, D = layer.num_heads, layer.num_components, layer.routing_dim
    params = [torch.from_numpy(_to_numpy(p)) for p in (layer.mu, layer.omega, layer.alpha)]
    padded = None
    if key_padding_mask is not None:
        padded = ~np.asarray(_to_numpy(key_padding_mask), dtype=bool)
        if padded.shape != (B, N):
            raise ValueError(f"gmattn.analysis: key_padding_mask must have shape (B, N) = ({B}, {N}), "
                             f"got {padded.shape}")
    out = {}
    with _InferenceMode(layer):
        for name, proj in (("q", layer.q_proj), ("k", layer.k_proj)):
            routed = _to_numpy(proj(x)).reshape(B, N, H, D)
            rows = max(1, _ROWS_PER_CALL // (N * H * K * D))
            gamma = np.concatenate([
                reference.responsibilities(torch.from_numpy(routed[b: b + rows]), *params,
                                           sigma_eps=layer.sigma_eps).numpy()
                for b in range(0, B, rows)])
            if padded is not None:
                gamma[padded] = np.nan
            out[name] = gamma
    return out


def capture_responsibilities(model: Any, tokens: Any, key_padding_mask: Optional[Any] = None
                             ) -> Dict[int, Dict[str, np.ndarray]]:
    """The responsibilities of every GMA block's queries and keys for one input.

    Args:
        model: a SequenceModel (gmattn.build_model, torch or MLX) or a single GaussianMixtureAttention
            layer (torch or MLX, e.g. a "gma" mixer).
        tokens: the model's tokens (B, N), or the layer's input x (B, N, d_model).
        key_padding_mask: optional (B, N) bool, True = real token; passed to the model, and the rows
            of padded tokens in the result are NaN.

    Returns:
        {block index: {"q": gamma_q, "k": gamma_k}}, NumPy float64 arrays (B, N, H, K) whose rows sum
        to 1: `gmattn.reference.responsibilities` of the block's q / k projections of its mixer's
        input (for a layer, the single key 0). The model runs in evaluation mode (no dropout; its mode
        is restored after).
    """
    if _is_gma_layer(model):
        return {0: _layer_responsibilities(model, tokens, key_padding_mask)}
    blocks = _gma_blocks(model)
    inputs = capture_mixer_inputs(model, tokens, key_padding_mask)
    return {i: _layer_responsibilities(blocks[i].mixer, u, key_padding_mask) for i, u in inputs.items()}


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def _real_rows(gamma: Any, who: str):
    """gamma (B, N, H, K) -> (its rows (T, H, K) without NaN (padding), which of the B N rows they are)."""
    g = np.asarray(gamma, dtype=np.float64)
    if g.ndim != 4:
        raise ValueError(f"{who}: gamma must have shape (B, N, H, K), got {g.shape}")
    rows = g.reshape(-1, *g.shape[2:])
    real = ~np.isnan(rows).any(axis=(1, 2))
    if not real.any():
        raise ValueError(f"{who}: gamma has no token without NaN (all padding)")
    return rows[real], real


def routing_stats(gamma: Any, labels: Optional[Any] = None) -> Dict[str, np.ndarray]:
    """Per-head statistics of responsibilities gamma (B, N, H, K) (rows with NaN, padding, are skipped).

    Returns a dict of arrays of length H:
        usage: the fraction of the K components whose mean responsibility over all (b, n) exceeds
            1 / (4 K) (a uniform router uses all of them; one that sends everything to one
            component uses 1 / K);
        entropy: the mean over tokens of the entropy of gamma[b, n, h, :], in nats (0 log 0 = 0;
            between 0 and log K);
        nmi (only with `labels`, integers (B, N)): the mutual information between the arg-max
            component and the label, divided by the label entropy, both from the empirical joint
            distribution over tokens (natural logs; 0: the arg-max says nothing about the label,
            1: it determines it).
    """
    rows, real = _real_rows(gamma, "routing_stats")
    B, N, H, K = np.shape(gamma)
    usage = (rows.mean(0) > 1.0 / (4 * K)).mean(-1)
    plogp = np.where(rows > 0, rows * np.log(np.where(rows > 0, rows, 1.0)), 0.0)
    stats = {"usage": usage, "entropy": -plogp.sum(-1).mean(0)}
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (B, N) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"routing_stats: labels must be integers of shape (B, N) = ({B}, {N}), "
                             f"got {lab.dtype} {lab.shape}")
        _, label_ids = np.unique(lab.reshape(-1)[real], return_inverse=True)
        label_ids = label_ids.reshape(-1)
        p_label = np.bincount(label_ids) / label_ids.size
        label_entropy = -(p_label * np.log(p_label)).sum()
        if label_entropy == 0:
            raise ValueError("routing_stats: the labels of the real tokens take a single value; NMI is undefined")
        winners = rows.argmax(-1)  # (T, H)
        nmi = np.empty(H)
        for h in range(H):
            joint = np.zeros((K, p_label.size))
            np.add.at(joint, (winners[:, h], label_ids), 1.0)
            joint /= joint.sum()
            outer = joint.sum(1, keepdims=True) * p_label[None, :]
            nz = joint > 0
            nmi[h] = (joint[nz] * np.log(joint[nz] / outer[nz])).sum() / label_entropy
        stats["nmi"] = nmi
    return stats


def routing_stability(layer: Any, x: Any, noise_scale: float, *, key_padding_mask: Optional[Any] = None,
                      num_samples: int = 1, seed: Optional[int] = 0) -> Dict[str, np.ndarray]:
    """How far the responsibilities of a GMA layer move when its input moves a little.

    x' = x + noise_scale * e with e ~ N(0, I) (one standard normal per coordinate of x, drawn with
    numpy.random.default_rng(seed), `num_samples` independent draws); for queries and keys alike,
    the distance of a token is the total variation 0.5 sum_k |gamma(x)[b,n,h,k] - gamma(x')[b,n,h,k]|
    (0: unchanged, 1: disjoint), averaged over tokens (padded ones skipped) and draws.
    `noise_scale` is absolute: after a LayerNorm the coordinates of x have unit scale.

    Args:
        layer: a GaussianMixtureAttention layer (torch or MLX; in a model: model.blocks[i].mixer, with
            x from `capture_mixer_inputs`).
        x: its input (B, N, d_model), an array of the layer's framework.
        noise_scale: standard deviation of the perturbation, >= 0.
        seed: seed of the draws (None: fresh entropy); the same seed gives the same result.

    Returns:
        {"q": (H,), "k": (H,)}: mean total-variation distance per head.
    """
    if not _is_gma_layer(layer):
        raise TypeError(f"routing_stability: layer must be a GaussianMixtureAttention layer (torch or MLX), "
                        f"got {type(layer).__name__}")
    if not (noise_scale >= 0 and math.isfinite(noise_scale)):
        raise ValueError(f"routing_stability: noise_scale must be finite and >= 0, got {noise_scale}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"routing_stability: num_samples must be a positive int, got {num_samples!r}")
    clean = _layer_responsibilities(layer, x, key_padding_mask)
    x_np = _to_numpy(x)
    rng = np.random.default_rng(seed)
    total = {name: np.zeros(layer.num_heads) for name in clean}
    for _ in range(num_samples):
        noisy_x = _to_framework(x, x_np + noise_scale * rng.standard_normal(x_np.shape))
        noisy = _layer_responsibilities(layer, noisy_x, key_padding_mask)
        for name in clean:
            tv = 0.5 * np.abs(clean[name] - noisy[name]).sum(-1)  # (B, N, H), NaN on padding
            total[name] += np.nanmean(tv.reshape(-1, layer.num_heads), axis=0)
    return {name: value / num_samples for name, value in total.items()}


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("gmattn.analysis plots need matplotlib, an optional dependency: "
                          f"pip install matplotlib ({exc})") from exc
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # no display needed; an interactive session's backend stays as chosen
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: Optional[str]):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}


def plot_responsibilities(gamma: Any, text: Sequence[str], *, head: int = 0, row: int = 0,
                          max_chars: int = 96, title: Optional[str] = None, path: Optional[str] = None):
    """Heat map of the responsibilities of one head over a text: components (rows) against the
    text's characters (columns, labelled by the characters; space, newline and tab drawn as
    visible marks). gamma (B, N, H, K) with N >= len(text) (one token per character, as a
    byte-level model reads ASCII text); `row` picks the batch row, `max_chars` the first characters
    shown. Returns the matplotlib Figure; `path` also writes it (PNG)."""
    plt = _pyplot()
    g = np.asarray(gamma, dtype=np.float64)
    if g.ndim != 4:
        raise ValueError(f"plot_responsibilities: gamma must have shape (B, N, H, K), got {g.shape}")
    chars = list(text)[: min(max_chars, g.shape[1])]
    if not chars:
        raise ValueError("plot_responsibilities: text is empty")
    part = g[row, : len(chars), head].T  # (K, n)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.14 * len(chars) + 1.5), max(2.5, 0.16 * part.shape[0] + 1.2)))
    image = ax.imshow(part, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(chars)))
    ax.set_xticklabels([_VISIBLE.get(c, c) for c in chars], fontsize=7, family="monospace")
    ax.tick_params(axis="x", length=0)
    ax.set_ylabel("component")
    ax.set_title(title or f"responsibilities of head {head} over the text")
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01, label="gamma")
    return _finish(fig, path)


def plot_component_usage(gamma: Any, *, title: Optional[str] = None, path: Optional[str] = None):
    """Bars of each head's component usage (routing_stats' usage: the fraction of components whose
    mean responsibility exceeds 1/(4K)), labelled with the number of components used. Returns the
    Figure; `path` also writes it."""
    plt = _pyplot()
    usage = routing_stats(gamma)["usage"]
    K = np.asarray(gamma).shape[-1]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * usage.size + 2.0), 3.2))
    bars = ax.bar(range(usage.size), usage, color="tab:red")
    for bar, u in zip(bars, usage):
        ax.text(bar.get_x() + bar.get_width() / 2, u + 0.01, f"{round(u * K)}/{K}", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(range(usage.size))
    ax.set_xlabel("head")
    ax.set_ylabel("fraction of components\nwith mean gamma > 1/(4K)")
    ax.set_ylim(0, 1.12)
    ax.set_title(title or "component usage per head")
    return _finish(fig, path)


def plot_usage_matrix(gamma: Any, *, title: Optional[str] = None, path: Optional[str] = None):
    """Heat map head x component of the mean responsibility over all real tokens, on a log colour
    scale; components at or below the usage threshold 1/(4K) are marked with a dot. Returns the
    Figure; `path` also writes it."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    mean = _real_rows(gamma, "plot_usage_matrix")[0].mean(0)  # (H, K)
    H, K = mean.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.22 * K + 2.0), max(2.2, 0.4 * H + 1.2)))
    floor = max(float(mean[mean > 0].min()) if (mean > 0).any() else 1e-6, 1e-6)
    image = ax.imshow(np.maximum(mean, floor), aspect="auto", cmap="magma",
                      norm=LogNorm(vmin=floor, vmax=max(float(mean.max()), floor * 10)), interpolation="nearest")
    unused = np.argwhere(mean <= 1.0 / (4 * K))
    if unused.size:
        ax.scatter(unused[:, 1], unused[:, 0], s=10, c="white", edgecolors="black", linewidths=0.5, marker="o")
    ax.set_xlabel("component")
    ax.set_ylabel("head")
    ax.set_yticks(range(H))
    ax.set_title(title or "mean responsibility, head x component\n(dots: unused, mean <= 1/(4K))", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="mean gamma")
    return _finish(fig, path)
