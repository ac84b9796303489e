"""Framework-neutral helpers shared by the torch and MLX mixers, blocks and models.

What both frameworks must agree on lives here once: argument checks and their messages, the
attribute names and sizes of the sublayers (weight exchange matches them by name), and the
bookkeeping of the SequenceModel state. Where a helper builds or runs layers, the framework's
own pieces (its nn namespace, its Linear class) are parameters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import _layer_spec
from .._checks import check_input  # noqa: F401 (the mixers' input check; the GMA layers share it)
from . import weights as _weights
from .config import MixerConfig

LINEAR_CHUNK = 64
"""Chunk length of the causal linear / performer scan (intra-chunk quadratic, inter-chunk state)."""

SSM_CHUNK = 64
"""Chunk length of the ssm kind's chunked scan; also the group length of its scan over chunk states."""

SSM_NORM_EPS = 1e-5
"""Epsilon of the ssm kind's gated RMSNorm (Mamba-2's)."""

SSM_DECAY_RANGE = (1.0, 16.0)
"""-A (the per-head decay rate) starts uniform in this range (Mamba-2's initialisation)."""

SSM_STEP_RANGE = (1e-3, 1e-1)
"""The step size softplus(dt_bias) starts log-uniform in this range (Mamba-2's), floored at 1e-4."""


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


def check_mask(name: str, mask_shape, B: int, N: int) -> None:
    if tuple(int(s) for s in mask_shape) != (B, N):
        raise ValueError(
            f"{name}: key_padding_mask must have shape (B, N) = ({B}, {N}) with True = real token, "
            f"got {tuple(int(s) for s in mask_shape)}"
        )


def check_call(name: str, d_model: int, x: Any, key_padding_mask: Optional[Any]) -> Tuple[Any, Any]:
    """Checks the shapes of x (B, N, d_model) and key_padding_mask (B, N) of a mixer call; returns (B, N)."""
    check_input(name, x.shape, d_model)
    B, N = x.shape[0], x.shape[1]
    if key_padding_mask is not None:
        check_mask(name, key_padding_mask.shape, B, N)
    return B, N


def check_model_args(head: str, num_classes, pooling: str, tie_embeddings: bool) -> None:
    if head not in ("lm", "classification"):
        raise ValueError(f"SequenceModel: head must be 'lm' or 'classification', got {head!r}")
    if head == "classification" and not num_classes:
        raise ValueError("SequenceModel: the classification head needs num_classes")
    if pooling not in ("mean", "last"):
        raise ValueError(f"SequenceModel: pooling must be 'mean' or 'last', got {pooling!r}")
    if tie_embeddings and head != "lm":
        raise ValueError("SequenceModel: tie_embeddings needs the 'lm' head")


class Exchange:
    """Weight exchange methods shared by every mixer, block and model of both frameworks."""

    def export_weights(self):
        """{framework-neutral name: np.ndarray}; loads into the other framework's twin with `import_weights`."""
        return _weights.export_weights(self)

    def import_weights(self, weights, strict: bool = True):
        """Load a dict from `export_weights` of either framework. Returns self."""
        return _weights.import_weights(self, weights, strict=strict)


# ----------------------------------------------------------------------------------------------
# Construction: the same attribute names and sizes in both frameworks
# ----------------------------------------------------------------------------------------------
def gma_layer_arguments(config: MixerConfig) -> Dict[str, Any]:
    """Keyword arguments of GaussianMixtureAttention (torch or MLX) for a "gma" MixerConfig."""
    return dict(d_model=config.d_model, num_heads=config.num_heads, num_components=config.num_components,
                head_dim=config.head_dim, routing_dim=config.routing_dim, causal=config.causal, eps=config.eps,
                sigma_eps=config.sigma_eps, bias=config.bias)


def init_projected_mixer(mixer: Any, linear: Callable[..., Any], config: MixerConfig, qk_dim: int) -> None:
    """Sets the sizes and the q/k/v/out projections of a baseline mixer; `linear` is the
    framework's nn.Linear (both take (in_features, out_features, bias=...))."""
    mixer.config = config
    H, Dv, d = config.num_heads, config.resolved_head_dim, config.d_model
    mixer.num_heads, mixer.qk_dim, mixer.head_dim, mixer.causal = H, qk_dim, Dv, config.causal
    for name, (n_in, n_out) in _layer_spec.projections(d, H, qk_dim, Dv).items():
        setattr(mixer, name, linear(n_in, n_out, bias=config.bias))


def ssm_projections(config: MixerConfig) -> Dict[str, Tuple[int, int]]:
    """(in_features, out_features) of the ssm mixer's projections (nn.Linear), by attribute name, in
    the order they are created: the gate z and the input x (H P each), B and C (S each, shared by
    the heads), the step size dt (one per head) and the output."""
    d, H, P, S = config.d_model, config.num_heads, config.resolved_head_dim, config.state_dim
    return {"z_proj": (d, H * P), "x_proj": (d, H * P), "B_proj": (d, S), "C_proj": (d, S), "dt_proj": (d, H),
            "out_proj": (H * P, d)}


def ssm_conv_channels(config: MixerConfig) -> int:
    """Channels of the ssm mixer's short convolution: x, B and C side by side (H P + 2 S)."""
    return config.num_heads * config.resolved_head_dim + 2 * config.state_dim


def ssm_initial_parameters(config: MixerConfig, uniform: Callable[[Tuple[int, ...]], np.ndarray]
                           ) -> Dict[str, np.ndarray]:
    """Initial values (float32) of the ssm mixer's parameters besides its projections, by name, in
    the order they are created; `uniform(shape)` draws U[0, 1) from the framework's generator.

    conv_weight (C, W), conv_bias (C): PyTorch's Conv1d default, U(+-1/sqrt(W)) (absent when W = 0);
    dt_bias (H): the inverse softplus of a step size log-uniform in SSM_STEP_RANGE; A_log (H): the
    log of a decay rate uniform in SSM_DECAY_RANGE; D (H): ones (the skip connection); norm_weight
    (H P): ones.
    """
    H, P, W = config.num_heads, config.resolved_head_dim, config.conv_width
    params: Dict[str, np.ndarray] = {}
    if W:
        bound = 1.0 / np.sqrt(W)
        C = ssm_conv_channels(config)
        params["conv_weight"] = (2.0 * uniform((C, W)) - 1.0) * bound
        params["conv_bias"] = (2.0 * uniform((C,)) - 1.0) * bound
    lo, hi = np.log(SSM_STEP_RANGE[0]), np.log(SSM_STEP_RANGE[1])
    step = np.maximum(np.exp(lo + (hi - lo) * uniform((H,))), 1e-4)
    params["dt_bias"] = step + np.log(-np.expm1(-step))  # softplus(dt_bias) = step
    lo, hi = SSM_DECAY_RANGE
    params["A_log"] = np.log(lo + (hi - lo) * uniform((H,)))
    params["D"] = np.ones(H)
    params["norm_weight"] = np.ones(H * P)
    return {name: np.asarray(value, dtype=np.float32) for name, value in params.items()}


def init_ssm_mixer(mixer: Any, linear: Callable[..., Any], parameter: Callable[[np.ndarray], Any],
                   config: MixerConfig, uniform: Callable[[Tuple[int, ...]], np.ndarray]) -> None:
    """Sets the sizes, projections and parameters of an ssm mixer; `linear` is the framework's
    nn.Linear, `parameter` turns a NumPy array into the framework's trainable parameter."""
    mixer.config = config
    mixer.num_heads, mixer.head_dim, mixer.state_dim = config.num_heads, config.resolved_head_dim, config.state_dim
    mixer.conv_width, mixer.causal = config.conv_width, config.causal
    for name, (n_in, n_out) in ssm_projections(config).items():
        setattr(mixer, name, linear(n_in, n_out, bias=config.bias))
    for name, value in ssm_initial_parameters(config, uniform).items():
        setattr(mixer, name, parameter(value))


def init_block(block: Any, nn: Any, build: Callable[[MixerConfig], Any], config: MixerConfig, mlp_ratio: float,
               dropout: float, norm_eps: float) -> None:
    """Sets the sublayers of a MixerBlock: norm1, mixer, norm2, fc1, fc2, drop, created in this
    order (it fixes torch's state_dict order and the random draws of the initialisation). `nn` is
    torch.nn or mlx.nn, which spell LayerNorm, Linear and Dropout alike; `build` makes the mixer."""
    d = config.d_model
    hidden = int(round(mlp_ratio * d))
    block.config = config
    block.norm1 = nn.LayerNorm(d, eps=norm_eps)
    block.mixer = build(config)
    block.norm2 = nn.LayerNorm(d, eps=norm_eps)
    block.fc1 = nn.Linear(d, hidden)
    block.fc2 = nn.Linear(hidden, d)
    block.drop = nn.Dropout(dropout)


_MIXER_INPUT_OBSERVERS: List[Callable[[Any, Any], None]] = []


@contextlib.contextmanager
def observing_mixer_inputs(observe: Callable[[Any, Any], None]):
    """While the context is open, every MixerBlock (either framework) calls observe(block, u) with its
    mixer's input u = norm1(x) before running the mixer (gmattn.analysis reads the GMA blocks' routing
    inputs this way, without re-implementing the models' forward)."""
    _MIXER_INPUT_OBSERVERS.append(observe)
    try:
        yield
    finally:
        _MIXER_INPUT_OBSERVERS.remove(observe)


def run_block(block: Any, x: Any, key_padding_mask, state, return_state: bool, gelu: Callable[[Any], Any]):
    """MixerBlock's forward: x + drop(mixer(norm1(x))), then x + drop(fc2(gelu(fc1(norm2(x))))),
    returning (x, the mixer's state) with return_state. `gelu` is the framework's (exact, erf)."""
    u = block.norm1(x)
    for observe in _MIXER_INPUT_OBSERVERS:
        observe(block, u)
    h = block.mixer(u, key_padding_mask=key_padding_mask, state=state, return_state=return_state)
    if return_state:
        h, state = h
    x = x + block.drop(h)
    x = x + block.drop(block.fc2(gelu(block.fc1(block.norm2(x)))))
    return (x, state) if return_state else x


# ----------------------------------------------------------------------------------------------
# SequenceModel state: (position offset, [state of each block])
# ----------------------------------------------------------------------------------------------
def model_state(head_kind: str, state, return_state: bool, num_blocks: int) -> Tuple[int, Sequence]:
    """(position offset, per-block states) a SequenceModel call starts from; only the "lm" head
    carries a state."""
    if (state is not None or return_state) and head_kind != "lm":
        raise ValueError("SequenceModel: state is only carried with the 'lm' head")
    return (0, [None] * num_blocks) if state is None else state


def check_positions(offset: int, N: int, max_len: int) -> None:
    if offset + N > max_len:
        raise ValueError(f"SequenceModel: positions up to {offset + N} exceed max_len={max_len}")


def run_blocks(blocks: Sequence[Any], x: Any, key_padding_mask, layer_states: Sequence,
               return_state: bool) -> Tuple[Any, List]:
    """x through every block in turn, each with its own state; returns (x, the blocks' new states)
    (an empty list without return_state)."""
    new_states: List = []
    for block, s in zip(blocks, layer_states):
        if return_state:
            x, s = block(x, key_padding_mask=key_padding_mask, state=s, return_state=True)
            new_states.append(s)
        else:
            x = block(x, key_padding_mask=key_padding_mask, state=s)
    return x, new_states
