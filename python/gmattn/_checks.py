"""Framework-neutral argument checks and size bookkeeping for gma_attention and the modules.

Every front end (torch, MLX, NumPy) calls `check_arguments` before allocating outputs, so a
mistake gets one clear message naming the argument, whatever array library the caller uses.
The compiled modules check again (memory safety), but users should never need to read those.
The front ends also take the names of the array arguments and the shapes of the kernel outputs
from here, so the torch op, its fake and the NumPy/MLX host path cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

FLOATING = ("float16", "bfloat16", "float32", "float64")

STATE_NAMES = ("initial_state[0] (S)", "initial_state[1] (z)")
"""How error messages name the two arrays of `initial_state`."""


KNOWN_DTYPE_NAMES: dict = {}
"""dtype -> name, filled by the front ends when they are imported (NumPy's dtype.name is a Python
property, ~1.5 us a read) and never changed afterwards (torch.compile guards on what it reads)."""


def dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32, np.float32 / dtype('float32') and mx.float32 alike."""
    try:
        name = KNOWN_DTYPE_NAMES.get(dtype)
    except TypeError:  # an unhashable dtype-like
        name = None
    return name if name is not None else _dtype_name(dtype)


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", None)
    if isinstance(name, str):  # numpy dtype
        return name
    text = str(dtype)
    if text.startswith("<class"):  # numpy scalar type, e.g. np.float32
        text = text.split("'")[1]
    return text.rsplit(".", 1)[-1]


def accumulator_dtype_name(input_dtype: str) -> str:
    """State, saved responsibilities and mixture parameters run in float32 (float64 for float64)."""
    return "float64" if input_dtype == "float64" else "float32"


@dataclass(frozen=True)
class Dims:
    B: int
    N: int
    H: int
    K: int
    D: int
    Dv: int
    dtype: str  # dtype of q, k, v and out
    sequences: Any = None  # packed: S, the rows of the state tensors (None: B)

    @property
    def accumulator(self) -> str:
        return accumulator_dtype_name(self.dtype)


def _shape(x: Any) -> tuple:
    # The sizes as they are, never int(): under torch.export and torch.compile a dynamic size is
    # symbolic, and int() would pin the traced program to the length it was traced at.
    return tuple(x.shape)


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


ARRAY_TYPES = {"torch": "torch.Tensor", "mlx": "mlx.core.array", "numpy": "numpy.ndarray"}
"""The array type of each framework, as messages name it."""


def array_framework(x: Any) -> Optional[str]:
    """'torch', 'mlx' or 'numpy' for an array of that library (told by its type's module), else None."""
    module = type(x).__module__
    return next((name for name in ARRAY_TYPES if module == name or module.startswith(name + ".")), None)


def type_name(x: Any) -> str:
    """'numpy.ndarray', 'mlx.core.array', 'torch.Tensor', 'builtins.list': what a message calls x's type."""
    return f"{type(x).__module__}.{type(x).__qualname__}"


NATIVE_ARRAY_TYPES: dict = {}
"""framework -> its array type, registered by each front end when it is imported (gmattn.torch.ops,
gmattn.mlx.ops, gmattn.numpy_ops). require_framework's isinstance test on it is one torch.compile
can trace (a string test on the type's module is a graph break)."""


def require_framework(owner: str, name: str, x: Any, framework: str, reason: str) -> None:
    """Raises a TypeError naming `name` when x is not an array of `framework`; `reason` says why
    that framework is expected (an op's q, a module built for it)."""
    native = NATIVE_ARRAY_TYPES.get(framework)
    if native is not None and isinstance(x, native):
        return
    if array_framework(x) != framework:
        article = "an" if framework == "mlx" else "a"  # an em-el-ex array
        raise TypeError(f"{owner}: {name} must be {article} {ARRAY_TYPES[framework]} ({reason}), "
                        f"got {type_name(x)}")


def require_module_input(owner: str, name: str, x: Any, framework: str) -> None:
    """A module's input must be an array of the framework the module was built for."""
    other = "mlx" if framework == "torch" else "torch"
    convert = {"torch": "torch.as_tensor", "mlx": "mx.array"}[framework]
    module = {"torch": "a PyTorch", "mlx": "an MLX"}[framework]
    require_framework(owner, name, x, framework, f"this is {module} module: convert the input with {convert}, "
                      f"or build the module with framework={other!r} for {ARRAY_TYPES[other]} inputs")


def _require_rank(name: str, x: Any, rank: int, layout: str) -> tuple:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"gma_attention: '{name}' must be an array (torch, MLX or NumPy), got {type(x).__name__}")
    shape = _shape(x)
    if len(shape) != rank:
        raise ValueError(f"gma_attention: '{name}' must have {rank} dimensions {layout}, got shape {_fmt(shape)}")
    return shape


def _require_shape(name: str, x: Any, expected: tuple, layout: str) -> None:
    shape = _require_rank(name, x, len(expected), layout)
    if shape != expected:
        raise ValueError(f"gma_attention: '{name}' must have shape {layout} = {_fmt(expected)}, got {_fmt(shape)}")


def _require_floating(name: str, x: Any) -> str:
    name_ = dtype_name(x.dtype)
    if name_ not in FLOATING:
        raise TypeError(
            f"gma_attention: '{name}' must be a floating array (float16, bfloat16, float32 or float64), got {name_}"
        )
    return name_


def _plainly_valid(q, k, v, mu, omega, alpha, key_padding_mask, initial_state, eps, sigma_eps) -> Optional[Dims]:
    """The Dims of a call that plainly passes every check of check_arguments, in a few
    microseconds (a one-token decoding step is not much longer); None for anything else, and the
    full checks then run and name what is wrong. It accepts a subset of what they accept: concrete
    (not symbolic) sizes, in the limits; the dtypes they allow; every shape exactly as required."""
    try:
        B, N, H, D = q.shape
        Bv, Nv, Hv, Dv = v.shape
        H_, K, D_ = mu.shape
        names = [dtype_name(x.dtype) for x in (q, k, v, mu, omega, alpha)]
        shapes = (tuple(k.shape), tuple(omega.shape), tuple(alpha.shape))
    except (AttributeError, TypeError, ValueError):  # not arrays, wrong ranks
        return None
    sizes = (B, N, H, D, Dv, K)
    if (any(type(x) is not int for x in sizes) or min(sizes) < 1 or max(N, K, D, Dv, B * H) > 2 ** 31 - 1
            or (Bv, Nv, Hv, H_, D_) != (B, N, H, H, D) or shapes != ((B, N, H, D), (H, K, D), (H, K))):
        return None
    dtype, pdtype = names[0], names[3]
    if (dtype not in FLOATING or names[1:3] != [dtype, dtype] or names[4:] != [pdtype, pdtype]
            or not (pdtype == dtype or (pdtype == "float32" and dtype in ("float16", "bfloat16")))):
        return None
    if key_padding_mask is not None:
        if (getattr(key_padding_mask, "shape", None) is None or tuple(key_padding_mask.shape) != (B, N)
                or dtype_name(key_padding_mask.dtype) not in ("bool", "bool_")):
            return None
    if initial_state is not None:
        if type(initial_state) not in (tuple, list) or len(initial_state) != 2:
            return None
        S0, z0 = initial_state
        try:
            if (tuple(S0.shape) != (B, H, K, Dv) or tuple(z0.shape) != (B, H, K)
                    or dtype_name(S0.dtype) not in FLOATING or dtype_name(z0.dtype) not in FLOATING):
                return None
        except (AttributeError, TypeError):
            return None
    if not (type(eps) in (int, float) and type(sigma_eps) in (int, float) and 0 <= eps < math.inf
            and 0 < sigma_eps < math.inf):
        return None
    return Dims(B=B, N=N, H=H, K=K, D=D, Dv=Dv, dtype=dtype)


def check_arguments(
    q: Any,
    k: Any,
    v: Any,
    mu: Any,
    omega: Any,
    alpha: Any,
    key_padding_mask: Optional[Any],
    initial_state: Optional[Any],
    eps: float,
    sigma_eps: float,
    cu_seqlens: Optional[Any] = None,
) -> Dims:
    """Validates shapes, dtypes and scalars; returns the problem's dimensions. With `cu_seqlens`
    (packed sequences) its shape and dtype; its values are checked by the compiled core, which
    reads them anyway (here they would be a device sync, and a graph break under torch.compile)."""
    if cu_seqlens is None:  # (packed calls take the full checks: their states have S rows, not B)
        dims = _plainly_valid(q, k, v, mu, omega, alpha, key_padding_mask, initial_state, eps, sigma_eps)
        if dims is not None:
            return dims
    B, N, H, D = _require_rank("q", q, 4, "(B, N, H, D)")
    _require_shape("k", k, (B, N, H, D), "(B, N, H, D)")
    vB, vN, vH, Dv = _require_rank("v", v, 4, "(B, N, H, Dv)")
    if (vB, vN, vH) != (B, N, H):
        raise ValueError(
            f"gma_attention: 'v' must have shape (B, N, H, Dv) with (B, N, H) = {_fmt((B, N, H))} like q, "
            f"got {_fmt((vB, vN, vH, Dv))}"
        )
    mH, K, mD = _require_rank("mu", mu, 3, "(H, K, D)")
    if mH != H or mD != D:
        # q in the (B, H, N, D) layout of scaled_dot_product_attention reads as H = its N.
        layout_hint = (f"; q {_fmt((B, N, H, D))} looks like the (B, H, N, D) layout of "
                       "scaled_dot_product_attention: gma_attention takes q, k, v as (B, N, H, D), "
                       "e.g. q.transpose(1, 2)") if mH == N != H and mD == D else ""
        raise ValueError(
            f"gma_attention: 'mu' must have shape (H, K, D) with H={H}, D={D} (from q), got {_fmt((mH, K, mD))}"
            + layout_hint
        )
    # mu, omega and alpha each carry K: when they disagree, blame the odd one out, not whichever
    # is checked against mu.
    ks = {"mu": K, "omega": _require_rank("omega", omega, 3, "(H, K, D)")[1],
          "alpha": _require_rank("alpha", alpha, 2, "(H, K)")[1]}
    odd = [name for name in ks if list(ks.values()).count(ks[name]) == 1]
    if len(odd) == 1:
        rest = [name for name in ks if name != odd[0]]
        raise ValueError(
            f"gma_attention: '{odd[0]}' has K={ks[odd[0]]} components but {rest[0]} and {rest[1]} have "
            f"K={ks[rest[0]]} (mu, omega: (H, K, D); alpha: (H, K))"
        )
    if len(odd) == 3:
        raise ValueError("gma_attention: the mixture parameters disagree on K (components): "
                         + ", ".join(f"'{name}' has K={k}" for name, k in ks.items()))
    _require_shape("omega", omega, (H, K, D), "(H, K, D)")
    _require_shape("alpha", alpha, (H, K), "(H, K)")
    for name, size in (("B (batch)", B), ("N (sequence length)", N), ("H (heads)", H), ("D (routing dim)", D),
                       ("Dv (value dim)", Dv), ("K (components)", K)):
        if size < 1:
            raise ValueError(f"gma_attention: {name} must be at least 1, got {size}")
    # The kernels count rows, components and (batch, head) pairs in 32 bits: refuse before any
    # output is allocated (an N = 2^31 output alone is 8 GiB). A symbolic size (torch.compile,
    # torch.export) is not bounded here: the guard would cap every dynamic size of an exported
    # program at 2^31-1, and the compiled module refuses such sizes itself when the program runs.
    for name, size in (("N (sequence length)", N), ("K (components)", K), ("D (routing dim)", D),
                       ("Dv (value dim)", Dv), ("B * H (batch x heads)", B * H)):
        if isinstance(size, int) and size > 2 ** 31 - 1:
            raise ValueError(f"gma_attention: {name} = {size} exceeds 2^31-1, which the kernels do not support")

    dtype = _require_floating("q", q)
    for name, x in (("k", k), ("v", v)):
        other = _require_floating(name, x)
        if other != dtype:
            raise TypeError(f"gma_attention: '{name}' must have the dtype of q ({dtype}), got {other}")
    pdtype = _require_floating("mu", mu)
    for name, x in (("omega", omega), ("alpha", alpha)):
        other = _require_floating(name, x)
        if other != pdtype:
            raise TypeError(f"gma_attention: '{name}' must have the dtype of mu ({pdtype}), got {other}")
    if pdtype != dtype and not (pdtype == "float32" and dtype in ("float16", "bfloat16")):
        raise TypeError(
            f"gma_attention: the mixture parameters (mu, omega, alpha) are {pdtype} but q, k, v are {dtype}; "
            "they must match, except float32 parameters with float16/bfloat16 inputs (mixed precision)"
        )

    if key_padding_mask is not None:
        _require_shape("key_padding_mask", key_padding_mask, (B, N), "(B, N)")
        mdtype = dtype_name(key_padding_mask.dtype)
        if mdtype not in ("bool", "bool_"):
            raise TypeError(f"gma_attention: 'key_padding_mask' must be a bool array (True = real token), got {mdtype}")

    sequences = None if cu_seqlens is None else check_sequences(cu_seqlens, B, key_padding_mask)
    if initial_state is not None:
        rows, row_name = (B, "B") if sequences is None else (sequences, "S")
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError(f"gma_attention: 'initial_state' must be a pair (S, z) with S ({row_name}, H, K, Dv), "
                            f"z ({row_name}, H, K)")
        S0, z0 = initial_state
        S_name, z_name = STATE_NAMES
        _require_shape(S_name, S0, (rows, H, K, Dv), f"({row_name}, H, K, Dv)")
        _require_shape(z_name, z0, (rows, H, K), f"({row_name}, H, K)")
        _require_floating(S_name, S0)
        _require_floating(z_name, z0)

    # Comparisons only (NaN fails them): torch.compile traces them, also when it makes the
    # floats symbolic (dynamic=True), where math.isfinite breaks the graph.
    if not (0 <= eps < math.inf):
        raise ValueError(f"gma_attention: 'eps' must be >= 0 and finite, got {eps}")
    if not (0 < sigma_eps < math.inf):
        raise ValueError(f"gma_attention: 'sigma_eps' must be > 0 and finite, got {sigma_eps}")
    return Dims(B=B, N=N, H=H, K=K, D=D, Dv=Dv, dtype=dtype, sequences=sequences)


OFFSET_DTYPES = ("int32", "int64")


def check_sequences(cu_seqlens: Any, B: Any, key_padding_mask: Optional[Any]) -> Any:
    """Packed sequences: `cu_seqlens` must be a 1-D int32/int64 array of S + 1 offsets (S >= 1)
    for q, k, v with B = 1 and no key_padding_mask. Returns S."""
    shape = _require_rank("cu_seqlens", cu_seqlens, 1, "(S + 1,)")
    odtype = dtype_name(cu_seqlens.dtype)
    if odtype not in OFFSET_DTYPES:
        raise TypeError(f"gma_attention: 'cu_seqlens' must be an int32 or int64 array of offsets, got {odtype}")
    if shape[0] < 2:
        raise ValueError(f"gma_attention: 'cu_seqlens' must hold S + 1 >= 2 offsets (0, the end of each of S "
                         f"sequences), got shape {_fmt(shape)}")
    if B != 1:
        raise ValueError(f"gma_attention: with 'cu_seqlens' the sequences are packed into one row: q, k, v must "
                         f"have B = 1, got B = {B}")
    if key_padding_mask is not None:
        raise ValueError("gma_attention: 'key_padding_mask' cannot be combined with 'cu_seqlens': pack only the "
                         "real tokens (padding is what packing removes)")
    return shape[0] - 1


def array_arguments(k: Any, v: Any, mu: Any, omega: Any, alpha: Any, key_padding_mask: Optional[Any],
                    initial_state: Optional[Any] = None, cu_seqlens: Optional[Any] = None) -> List[Tuple[str, Any]]:
    """(name, array) for every array argument after q that is given, in the order of the signature.

    Front ends check what check_arguments cannot (the array type, the device) against q with it.
    Pass `initial_state` only once check_arguments has accepted it as a pair.
    """
    pairs = [("k", k), ("v", v), ("mu", mu), ("omega", omega), ("alpha", alpha), ("key_padding_mask", key_padding_mask)]
    if initial_state is not None:
        pairs += zip(STATE_NAMES, initial_state)
    pairs.append(("cu_seqlens", cu_seqlens))
    return [(name, x) for name, x in pairs if x is not None]


def state_shapes(q: Any, v: Any, mu: Any, cu_seqlens: Optional[Any] = None) -> Tuple[tuple, tuple]:
    """Shapes of the state (S (B, H, K, Dv), z (B, H, K)) for inputs q (B, N, H, D), v, mu; with
    packed sequences (cu_seqlens of S + 1 offsets) S in place of B."""
    B, _, H, _ = q.shape
    if cu_seqlens is not None:
        B = cu_seqlens.shape[0] - 1
    K, Dv = mu.shape[1], v.shape[3]
    return (B, H, K, Dv), (B, H, K)


# Packed sequences of at most this many tokens on average: the backward does not reuse the final
# state (the CPU core's chunk length; see backward_reuses_state).
PACKED_REUSE_MIN_TOKENS = 64
# Sequences of at most this many tokens: the CPU core runs them a row at a time (kRowPathRows,
# cpp/cpu/step.h), and its backward reads no final state.
ROW_PATH_ROWS = 4


_INDEX_LIMIT = 2 ** 31 - 1  # the kernels' 32-bit row, component and (batch, head) counts


def plain_step_dims(q: Any, k: Any, v: Any, mu: Any, omega: Any, alpha: Any, causal: Any, eps: Any,
                    sigma_eps: Any) -> Optional[Tuple[int, ...]]:
    """(B, N, H, D, Dv, K) when a call plainly fits the CPU module's plain entry `step` (shapes that
    agree and that the kernels can index, a bool `causal`, float scalars in range), else None. The
    front ends test this before allocating outputs for `step` (which runs forward's remaining checks
    itself); anything else takes the general path and its messages."""
    if not (type(causal) is bool and type(eps) is float and type(sigma_eps) is float and 0.0 <= eps < math.inf
            and 0.0 < sigma_eps < math.inf and q.ndim == 4 and v.ndim == 4 and mu.ndim == 3 and k.shape == q.shape
            and omega.shape == mu.shape):
        return None
    B, N, H, D = q.shape
    Bv, Nv, Hv, Dv = v.shape
    Hm, K, Dm = mu.shape
    if not (Bv == B and Nv == N and Hv == H == Hm and Dm == D and alpha.shape == (H, K) and B * N * H * D * Dv * K
            and N <= _INDEX_LIMIT and K <= _INDEX_LIMIT and D <= _INDEX_LIMIT and Dv <= _INDEX_LIMIT
            and B * H <= _INDEX_LIMIT):
        return None
    return B, N, H, D, Dv, K


def backward_reuses_state(causal: bool, save_for_backward: bool, q: Any = None,
                          cu_seqlens: Optional[Any] = None) -> bool:
    """Whether the forward also computes the final state for the backward: bidirectional, the
    final state is what every query read, and the core's backward takes it (S_end, z_end) instead
    of summing the keys again. The front ends ask the forward for it then, asked for or not.
    Not for packed sequences (q (1, N, ...), cu_seqlens of S + 1 offsets) of at most
    PACKED_REUSE_MIN_TOKENS tokens on average: the CPU core runs short sequences in shared chunks
    whose backward reads no state, and forming and writing S final states of K x Dv values would
    cost more than the long sequences' backward saves (from shapes only: traceable). Nor for
    sequences of at most ROW_PATH_ROWS tokens, whose backward reads no state either."""
    if cu_seqlens is not None and q.shape[1] <= PACKED_REUSE_MIN_TOKENS * (cu_seqlens.shape[0] - 1):
        return False
    if cu_seqlens is None and q is not None and type(q.shape[1]) is int and q.shape[1] <= ROW_PATH_ROWS:
        return False  # (a concrete size only: on a symbolic one the test would be a guard)
    return save_for_backward and not causal


def forward_output_shapes(q: Any, v: Any, mu: Any, return_state: bool, save_for_backward: bool,
                          cu_seqlens: Optional[Any] = None) -> Tuple[Optional[tuple], ...]:
    """Shapes of the forward kernel's outputs (out, S_final, z_final, gq, gk, den); None for an
    output not requested (the state without `return_state`, the responsibilities gq, gk and the
    denominators den without `save_for_backward`). Sizes are q.shape's own (symbolic under torch.compile)."""
    B, N, H, _ = q.shape
    K, Dv = mu.shape[1], v.shape[3]
    S, z = state_shapes(q, v, mu, cu_seqlens) if return_state else (None, None)
    g, den = ((B, H, N, K), (B, H, N)) if save_for_backward else (None, None)
    return (B, N, H, Dv), S, z, g, g, den


# ----------------------------------------------------------------------------------------------
# Module inputs (the GMA layers and the mixers)
# ----------------------------------------------------------------------------------------------
def check_input(name: str, shape, d_model: int) -> None:
    """x of a module call must be (B, N, d_model); `name` is the module's, for the message."""
    # No int() on the sizes being compared: under torch.compile they may be symbolic.
    if len(shape) != 3 or shape[-1] != d_model:
        raise ValueError(f"{name}: x must have shape (B, N, d_model={d_model}), got {tuple(int(s) for s in shape)}")
