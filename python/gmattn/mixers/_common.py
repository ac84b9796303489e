"""Framework-neutral helpers shared by the torch and MLX mixers, blocks and models.

What both frameworks must agree on lives here once: argument checks and their messages, the
attribute names and sizes of the sublayers (weight exchange matches them by name), and the
bookkeeping of the SequenceModel state. Where a helper builds or runs layers, the framework's
own pieces (its nn namespace, its Linear class) are parameters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _layer_spec
from .._checks import check_input, check_sequences, require_module_input  # the GMA layers share these checks
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
    # No int() on the sizes compared: under torch.export they may be symbolic (int() would pin them).
    if tuple(mask_shape) != (B, N):
        raise ValueError(
            f"{name}: key_padding_mask must have shape (B, N) = ({B}, {N}) with True = real token, "
            f"got {tuple(int(s) for s in mask_shape)}"
        )


def check_call(name: str, d_model: int, x: Any, key_padding_mask: Optional[Any], *, framework: str) -> Tuple[Any, Any]:
    """Checks the array type and shape of x (B, N, d_model) and key_padding_mask (B, N) of a mixer
    call; returns (B, N)."""
    require_module_input(name, "x", x, framework)
    check_input(name, x.shape, d_model)
    B, N = x.shape[0], x.shape[1]
    if key_padding_mask is not None:
        check_mask(name, key_padding_mask.shape, B, N)
    return B, N


# ----------------------------------------------------------------------------------------------
# Packed sequences (cu_seqlens): S sequences one after another in the one row of x (B = 1)
# ----------------------------------------------------------------------------------------------
class ArrayOps(NamedTuple):
    """What the packed-sequence helpers need from a framework besides slicing."""

    concat: Callable[[List[Any], int], Any]
    """concat(arrays, axis): join arrays along an axis."""
    zeros: Callable[[Any, Tuple[int, ...]], Any]
    """zeros(like, shape): zeros (False for bool) of `shape` with like's dtype (and device)."""


def host_offsets(owner: str, cu_seqlens: Any, B: int, N: int, key_padding_mask: Optional[Any],
                 framework: str) -> List[int]:
    """The S + 1 offsets of packed sequences as Python ints, checked: an array of `framework`, the
    op's checks of shape, dtype, B = 1 and no key_padding_mask (gmattn._checks.check_sequences, its
    messages naming `owner`), then the values, in the words of the compiled core's checks."""
    require_module_input(owner, "cu_seqlens", cu_seqlens, framework)
    try:
        check_sequences(cu_seqlens, B, key_padding_mask)
    except (TypeError, ValueError) as exc:
        # The op's checks name the op; the caller here is a module.
        raise type(exc)(str(exc).replace("gma_attention:", f"{owner}:", 1)) from None
    offsets = [int(o) for o in cu_seqlens.tolist()]
    if offsets[0] != 0:
        raise ValueError(f"{owner}: 'cu_seqlens' must start at 0, got {offsets[0]}")
    if offsets[-1] != N:
        raise ValueError(f"{owner}: 'cu_seqlens' must end at N = {N} (the tokens of x), got {offsets[-1]}")
    for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        if hi < lo:
            raise ValueError(f"{owner}: 'cu_seqlens' must not decrease, got {lo} then {hi} at {i}")
    return offsets


def run_mixer(mixer: Any, ops: ArrayOps, framework: str, x: Any, key_padding_mask, state, return_state: bool,
              cu_seqlens: Optional[Any]):
    """A baseline mixer's call. Without cu_seqlens: its `unpacked(x, key_padding_mask, state,
    return_state)`. With packed sequences: each sequence's slice of x through `unpacked` on its own,
    from its row of `state` (one row per sequence, as a packed call returns it); the outputs are
    concatenated along N and, with return_state, the sequences' states stacked by `stack_states`.
    An empty sequence outputs nothing and keeps its state."""
    if cu_seqlens is None:
        return mixer.unpacked(x, key_padding_mask, state, return_state)
    owner = type(mixer).__name__
    B, N = check_call(owner, mixer.config.d_model, x, key_padding_mask, framework=framework)
    offsets = host_offsets(owner, cu_seqlens, B, N, key_padding_mask, framework)
    S = len(offsets) - 1
    if N == 0:
        raise ValueError(f"{owner}: packed sequences need at least one token, got N = 0")
    if state is not None:
        rows = [int(t.shape[0]) for t in state]
        if any(r != S for r in rows):
            raise ValueError(f"{owner}: with cu_seqlens the state has one row per sequence: S = {S} rows, "
                             f"got {rows}")
    outs, states = [], []
    for s, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        row = None if state is None else tuple(t[s: s + 1] for t in state)
        if hi == lo:
            states.append(row)
            continue
        result = mixer.unpacked(x[:, lo:hi], None, row, return_state)
        y, new_state = result if return_state else (result, None)
        outs.append(y)
        states.append(new_state)
    y = ops.concat(outs, 1)
    return (y, stack_states(ops, states)) if return_state else y


def stack_states(ops: ArrayOps, states: Sequence[Optional[Tuple[Any, ...]]]) -> Tuple[Any, ...]:
    """One state with a row per sequence from the sequences' states (tuples of arrays of one row;
    None: an empty sequence without a state, whose state is zeros). Sizes that differ between
    sequences (the length T of the softmax KV cache) are padded at the end with zeros, which in the
    cache's mask are False: the padded slots are masked keys, never read."""
    like = next(st for st in states if st is not None)
    stacked = []
    for i, ref in enumerate(like):
        shape = tuple(max(int(st[i].shape[a]) for st in states if st is not None) for a in range(1, ref.ndim))
        rows = []
        for st in states:
            if st is None:
                rows.append(ops.zeros(ref, (1, *shape)))
                continue
            t = st[i]
            for a in range(1, t.ndim):
                gap = shape[a - 1] - int(t.shape[a])
                if gap:
                    t = ops.concat([t, ops.zeros(t, (*t.shape[:a], gap, *t.shape[a + 1:]))], a)
            rows.append(t)
        stacked.append(ops.concat(rows, 0))
    return tuple(stacked)


def packed_positions(owner: str, tokens: Any, key_padding_mask, cu_seqlens: Any, framework: str,
                     start: Union[int, Sequence[int]], max_len: Optional[int]
                     ) -> Tuple[List[int], np.ndarray, Tuple[int, ...]]:
    """Positions of a SequenceModel call on packed sequences: they restart at each sequence's first
    token, counting from the sequence's `start` (one int per sequence, or one int for all: the
    position offset of the state the call continues). Returns the offsets, the positions (N,) int64
    and each sequence's position after the call (the next call's starts)."""
    B, N = tokens.shape
    offsets = host_offsets(owner, cu_seqlens, B, N, key_padding_mask, framework)
    S = len(offsets) - 1
    starts = [int(start)] * S if isinstance(start, (int, np.integer)) else [int(s) for s in start]
    if len(starts) != S:
        raise ValueError(f"{owner}: the state's position offsets are for {len(starts)} sequences, "
                         f"cu_seqlens has S = {S}")
    lengths = np.diff(np.asarray(offsets, dtype=np.int64))
    positions = np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], lengths) + np.arange(N, dtype=np.int64)
    ends = tuple(s + int(n) for s, n in zip(starts, lengths))
    if max_len is not None:
        check_positions(max(ends), 0, max_len)
    return offsets, positions, ends


def pool_packed(ops: ArrayOps, x: Any, offsets: Sequence[int], pooling: str) -> Any:
    """The classification head's pooling of packed sequences: (1, N, d) -> (S, d), the mean or the
    last token of each sequence; an empty sequence pools to zeros."""
    rows = []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        if pooling == "last" and hi > lo:
            rows.append(x[0, hi - 1: hi])
        else:
            rows.append(x[0, lo:hi].sum(0)[None] / max(hi - lo, 1))
    return ops.concat(rows, 0)


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


def run_block(block: Any, framework: str, x: Any, key_padding_mask, state, return_state: bool,
              gelu: Callable[[Any], Any], cu_seqlens: Optional[Any] = None):
    """MixerBlock's forward: x + drop(mixer(norm1(x))), then x + drop(fc2(gelu(fc1(norm2(x))))),
    returning (x, the mixer's state) with return_state. `gelu` is the framework's (exact, erf).
    Only the mixer mixes tokens, so packed sequences (cu_seqlens) are the mixer's business."""
    require_module_input(type(block).__name__, "x", x, framework)
    u = block.norm1(x)
    for observe in _MIXER_INPUT_OBSERVERS:
        observe(block, u)
    h = block.mixer(u, key_padding_mask=key_padding_mask, state=state, return_state=return_state,
                    cu_seqlens=cu_seqlens)
    if return_state:
        h, state = h
    x = x + block.drop(h)
    x = x + block.drop(block.fc2(gelu(block.fc1(block.norm2(x)))))
    return (x, state) if return_state else x


# ----------------------------------------------------------------------------------------------
# SequenceModel state: (position offset, [state of each block])
# ----------------------------------------------------------------------------------------------
def model_state(model: Any, framework: str, tokens: Any, state, return_state: bool,
                cu_seqlens: Optional[Any] = None) -> Tuple[Union[int, Tuple[int, ...]], Sequence]:
    """Checks a SequenceModel call's tokens; returns the (position offset, per-block states) it
    starts from (only the "lm" head carries a state). After a call on packed sequences the position
    offset is a tuple, one per sequence, which only a call on packed sequences continues."""
    require_module_input(type(model).__name__, "tokens", tokens, framework)
    head_kind, num_blocks = model.head_kind, len(model.blocks)
    if (state is not None or return_state) and head_kind != "lm":
        raise ValueError("SequenceModel: state is only carried with the 'lm' head")
    if state is None:
        return 0, [None] * num_blocks
    if cu_seqlens is None and not isinstance(state[0], (int, np.integer)):
        raise ValueError("SequenceModel: this state continues packed sequences (a position offset per sequence); "
                         "pass their cu_seqlens")
    return state


def check_positions(offset: int, N: int, max_len: int) -> None:
    if offset + N > max_len:
        raise ValueError(f"SequenceModel: positions up to {offset + N} exceed max_len={max_len}")


def run_blocks(blocks: Sequence[Any], x: Any, key_padding_mask, layer_states: Sequence,
               return_state: bool, cu_seqlens: Optional[Any] = None) -> Tuple[Any, List]:
    """x through every block in turn, each with its own state; returns (x, the blocks' new states)
    (an empty list without return_state)."""
    new_states: List = []
    for block, s in zip(blocks, layer_states):
        if return_state:
            x, s = block(x, key_padding_mask=key_padding_mask, state=s, return_state=True, cu_seqlens=cu_seqlens)
            new_states.append(s)
        else:
            x = block(x, key_padding_mask=key_padding_mask, state=s, cu_seqlens=cu_seqlens)
    return x, new_states


# ----------------------------------------------------------------------------------------------
# SequenceModel.generate: prompt in one call, then one step per token with the carried state
# ----------------------------------------------------------------------------------------------
def check_generate_args(model: Any, tokens_shape, max_new_tokens, temperature, top_k, top_p, eos_token,
                        vocab_size: int) -> None:
    if model.head_kind != "lm":
        raise ValueError("SequenceModel.generate: needs the 'lm' head")
    if not model.config.causal:
        raise ValueError("SequenceModel.generate: needs a causal model (config causal=True); a bidirectional "
                         "mixer lets every position read the tokens after it")
    if len(tokens_shape) != 2 or tokens_shape[1] < 1:
        raise ValueError(f"SequenceModel.generate: tokens must have shape (B, N) with N >= 1, got {tuple(tokens_shape)}")
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"SequenceModel.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"SequenceModel.generate: temperature must be a finite number >= 0 (0: greedy), "
                         f"got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"SequenceModel.generate: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"SequenceModel.generate: top_p must be None or in (0, 1], got {top_p!r}")
    if eos_token is not None and not (isinstance(eos_token, (int, np.integer)) and 0 <= eos_token < vocab_size):
        raise ValueError(f"SequenceModel.generate: eos_token must be None or a token id in [0, {vocab_size}), "
                         f"got {eos_token!r}")


def sample_tokens(logits: np.ndarray, temperature: float, top_k: Optional[int], top_p: Optional[float],
                  rng: np.random.Generator) -> np.ndarray:
    """One token per row of logits (B, V): arg-max when temperature is 0, else a draw from
    softmax(logits / temperature) restricted to the top_k most likely tokens and then to the
    smallest set whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        # keep a token while the probability before it is below top_p (the most likely one always)
        keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


def generate_tokens(model: Any, tokens: Any, max_new_tokens: int, temperature: float, top_k, top_p, seed,
                    eos_token, last_logits: Callable[[Any], np.ndarray], as_tokens: Callable[[np.ndarray], Any],
                    concat: Callable[[List[Any]], Any], vocab_size: int):
    """SequenceModel.generate for both frameworks: `last_logits` turns the model's logits into a
    NumPy array (B, V) of the last position, `as_tokens` a NumPy column of token ids into the
    framework's (B, 1) array, `concat` joins (B, n) arrays along the sequence."""
    check_generate_args(model, tokens.shape, max_new_tokens, temperature, top_k, top_p, eos_token, vocab_size)
    if max_new_tokens == 0:
        return tokens
    rng = np.random.default_rng(seed)
    pieces = [tokens]
    logits, state = model(tokens, return_state=True)            # the prompt in one call
    done = np.zeros(tokens.shape[0], dtype=bool)
    for step in range(max_new_tokens):
        nxt = sample_tokens(last_logits(logits), temperature, top_k, top_p, rng)
        if eos_token is not None:
            nxt = np.where(done, eos_token, nxt)                # finished rows repeat eos
            done |= nxt == eos_token
        column = as_tokens(nxt.reshape(-1, 1))
        pieces.append(column)
        if step == max_new_tokens - 1 or (eos_token is not None and done.all()):
            break
        logits, state = model(column, state=state, return_state=True)
    return concat(pieces)
