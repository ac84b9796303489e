"""MLX front end: ``gma_attention`` on MLX arrays, by one of two implementations (backends).

Backends
--------
* ``"native"`` (the default): the forward and backward written as MLX operations
  (``gmattn.mlx.native``), wrapped in an ``mx.custom_function`` whose vjp is MLX operations too. It
  is lazy like any MLX op and runs where the caller's MLX code runs: the CPU, the Apple GPU through
  Metal, MLX's CUDA backend; it composes with ``mx.compile`` (forward and gradients), ``mx.vmap``,
  ``mx.grad`` / ``mx.vjp`` / ``nn.value_and_grad``, and streams (``with mx.stream(s):``).
* ``"core"``: the torch-free compiled CPU core ``gmattn._core`` (C++/OpenMP) behind an
  ``mx.custom_function`` (below). It evaluates its inputs (a synchronisation point) and runs on the
  CPU whatever the default device; it works eagerly and under ``mx.grad`` / ``mx.vjp``, and raises
  a clear error inside ``mx.compile`` or ``mx.vmap``.

Choosing: the default ``"auto"`` takes the native backend when MLX's default device is a GPU or
when the call is being traced (``mx.compile``, ``mx.vmap``), and the core otherwise (eager calls on
the CPU, where the core is an order of magnitude faster on Linux: ``benchmarks/mlx_paths.py``,
docs/mlx.md). MLX has no public "am I being traced" query; ``auto`` asks by evaluating the inputs,
which the core needs anyway, and MLX answers a traced input with its "function transformations"
error, the one signal taken as "traced" (any other error propagates). So an eager CPU call is a
synchronisation point, as the core always was; under a transformation or on a GPU nothing is
evaluated. ``gma_attention(..., backend="native" | "core")`` forces one for a call,
``gmattn.mlx.set_backend(...)`` for the process, the environment variable
``GMATTN_MLX_BACKEND`` when neither is given; the argument wins over ``set_backend``, which wins
over the variable. Both backends compute the same math and agree to rounding. The core does not
support forward-mode or second-order differentiation (a clear error names the native backend).

The core backend in detail
--------------------------
* The kernels are the torch-free compiled core ``gmattn._core`` (C++/OpenMP, CPU). There are no
  Metal kernels yet. MLX arrays live in host-addressable memory (unified memory on Apple
  silicon, ordinary RAM with ``mlx[cpu]`` on Linux), so the core reads them in place.
* If the MLX default device is the GPU, the op still works: its few MLX operations (dtype casts)
  are placed on the CPU stream, the kernels run on the CPU, and a ``RuntimeWarning`` says so
  once per process. The results are ordinary ``mx.array``s usable on either device.

Copies
------
* Inputs are not copied: each argument is evaluated (``mx.eval``) and viewed as a NumPy array
  through MLX's buffer protocol (same pointer, any strides), and the core reads that memory.
* Outputs are copied once: the core writes into fresh NumPy arrays, which become ``mx.array``s
  (MLX offers no zero-copy import of foreign memory). ``benchmarks/mlx_overhead.py`` measures
  what this costs against calling the core on NumPy arrays directly.

Dtypes
------
float32 and float64 run natively. float16 and bfloat16 inputs are up-cast to float32 at the
boundary (an MLX ``astype``), the core runs in float32 and the output is cast back to the input
dtype; the gradients of q, k, v come back in the input dtype through the cast's own vjp. The
mixture parameters and the state run in float32 (float64 for float64 inputs) whatever the
input dtype, as in docs/design.md section 1; the returned final state is float32 (float64).

Transformations
---------------
* ``mx.grad``, ``mx.value_and_grad``, ``nn.value_and_grad``, ``mx.vjp``: supported; the vjp calls
  the core's backward. Gradients reach q, k, v, mu, omega, alpha and the initial state.
* ``mx.compile``: not supported. The op calls compiled host code on evaluated arrays, and
  ``mx.compile`` traces with placeholder arrays that cannot be evaluated; calling the op inside a
  compiled function raises a ``RuntimeError`` that says so. Compile the code before and after
  the op separately (or leave the step uncompiled); nothing is silently wrong.
* ``mx.vmap`` fails like ``mx.compile`` (``RuntimeError``; the op already takes a batch axis B);
  ``mx.jvp`` and second-order gradients raise ``NotImplementedError``. Never a silently wrong
  (zero) derivative.
* Gradients recompute the forward unless ``save_for_backward=True`` (the layer sets it in
  training mode): the saved responsibilities, 2 B H N K + B H N accumulator floats, are held
  only until the vjp consumes them or the output is evaluated without a gradient.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .. import _checks, _ext  # noqa: F401 (tests and benchmarks/mlx_overhead.py patch _ext.core here)
_checks.NATIVE_ARRAY_TYPES["mlx"] = mx.array
# The host path is the NumPy front end's: MLX hands the core NumPy views of its arrays. Imported
# under these names, which a test patches.
from ..numpy_ops import host_backward as _host_backward
from ..numpy_ops import host_forward as _host_forward
from .native import gma_attention_native

__all__ = ["BACKENDS", "get_backend", "gma_attention", "set_backend"]

_LOW_PRECISION = ("float16", "bfloat16")

# Every MLX operation of this front end runs on the CPU stream: the kernels are CPU kernels, and
# the float64 path only exists on MLX's CPU backend.
_STREAM = mx.cpu

_gpu_warning_issued = False


def _default_device_is_gpu() -> bool:
    try:
        return mx.default_device().type == mx.gpu
    except Exception:  # an MLX without device introspection: assume the CPU
        return False


def _warn_if_gpu_default() -> None:
    """Warns once per process when the default device is the GPU (the op runs on the CPU)."""
    global _gpu_warning_issued
    if _gpu_warning_issued or not _default_device_is_gpu():
        return
    _gpu_warning_issued = True
    warnings.warn(
        "gmattn: the MLX default device is the GPU, but gmattn has no Metal/GPU kernels for MLX yet: "
        "gma_attention runs on the CPU (compiled OpenMP core) and its casts on the CPU stream. Inputs "
        "are read in place from unified memory and results are ordinary mx.arrays. "
        "(This warning is shown once.)",
        RuntimeWarning,
        stacklevel=3,
    )


def _transform_error(exc: Exception) -> Optional[RuntimeError]:
    text = str(exc)
    if "function transformations" in text:
        return RuntimeError(
            "gmattn: the 'core' backend of gma_attention cannot run inside mx.compile (or mx.vmap): it calls "
            "the compiled gmattn core on evaluated host arrays, and these transformations trace with "
            "placeholder arrays that cannot be evaluated. Use the 'native' backend (the default 'auto' "
            "picks it there; gmattn.mlx.set_backend('native') or backend='native'), which composes with every MLX "
            "transformation, or call the op outside the compiled function. (MLX said: " + text + ")"
        )
    return None


def _evaluate(arrays: Sequence[Any]) -> None:
    try:
        mx.eval(*[a for a in arrays if a is not None])
    except ValueError as exc:
        err = _transform_error(exc)
        if err is not None:
            raise err from exc
        raise


def _host(x: Optional[mx.array], name: str) -> Optional[np.ndarray]:
    """Zero-copy NumPy view of an evaluated mx.array (same memory, same strides)."""
    if x is None:
        return None
    try:
        view = np.asarray(x)
    except ValueError as exc:
        err = _transform_error(exc)
        if err is not None:
            raise err from exc
        raise
    if view.dtype.name != _checks.dtype_name(x.dtype):
        raise TypeError(f"gma_attention: internal error: '{name}' viewed as {view.dtype}, expected {x.dtype}")
    return view


def _cast(x: mx.array, dtype) -> mx.array:
    return x if x.dtype == dtype else x.astype(dtype, stream=_STREAM)


def _to_mlx(x: np.ndarray) -> mx.array:
    """Copies a kernel output into a new mx.array of the same dtype (mx.array alone turns float64
    into float32)."""
    return mx.array(x, dtype=getattr(mx, x.dtype.name))


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


_PRIMAL_NAMES = ("q", "k", "v", "mu", "omega", "alpha", *_checks.STATE_NAMES)


def _build_op(mask: Optional[np.ndarray], *, has_state: bool, causal: bool, eps: float, sigma_eps: float,
              return_state: bool, save: bool, num_threads: int, cu_seqlens: Optional[np.ndarray] = None):
    """One custom_function per call: the mask, the packed sequences' offsets and the options are
    constants of the closure, and the responsibilities saved by the forward (when `save`) live in it
    until the vjp takes them."""
    options = dict(causal=causal, eps=eps, sigma_eps=sigma_eps, cu_seqlens=cu_seqlens)
    saved: dict = {}

    def host_primals(primals):
        primals = _as_tuple(primals)
        _evaluate(primals)
        arrays = [_host(p, n) for p, n in zip(primals, _PRIMAL_NAMES)]
        if not has_state:
            arrays += [None, None]
        return arrays

    @mx.custom_function
    def op(*primals):
        q, k, v, mu, omega, alpha, S0, z0 = host_primals(primals)
        reuse = _checks.backward_reuses_state(causal, save, q, cu_seqlens)
        out, S_final, z_final, gq, gk, den = _host_forward(
            q, k, v, mu, omega, alpha, mask, S0, z0, return_state=return_state or reuse, save=save,
            num_threads=num_threads, **options,
        )
        if save:
            saved["forward"] = (out, gq, gk, den) + ((S_final, z_final) if reuse else (None, None))
        if return_state:
            return _to_mlx(out), _to_mlx(S_final), _to_mlx(z_final)
        return _to_mlx(out)

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        primals, cotangents = _as_tuple(primals), _as_tuple(cotangents)
        acc = primals[3].dtype
        # Cotangents come in the outputs' dtypes; be tolerant of a transformation that promoted them.
        dout = _cast(cotangents[0], primals[0].dtype)
        dS_final = dz_final = None
        if return_state:
            dS_final, dz_final = _cast(cotangents[1], acc), _cast(cotangents[2], acc)
        grads = _backward_op(primals, dout, dS_final, dz_final)
        return tuple(grads)

    def _backward_op(primals, dout, dS_final, dz_final):
        n_primals = len(primals)
        extra = (dout,) + ((dS_final, dz_final) if return_state else ())

        @mx.custom_function
        def backward(*arrays):
            primals_, extra_ = arrays[:n_primals], arrays[n_primals:]
            q, k, v, mu, omega, alpha, S0, z0 = host_primals(primals_)
            _evaluate(extra_)
            g = _host(extra_[0], "dout")
            dS = _host(extra_[1], "dS_final") if return_state else None
            dz = _host(extra_[2], "dz_final") if return_state else None
            record = saved.pop("forward", None)
            if record is None:  # forward ran without saving: recompute the responsibilities
                out, S_end, z_end, gq, gk, den = _host_forward(
                    q, k, v, mu, omega, alpha, mask, S0, z0,
                    return_state=_checks.backward_reuses_state(causal, True, q, cu_seqlens), save=True,
                    num_threads=num_threads, **options,
                )
            else:
                out, gq, gk, den, S_end, z_end = record
            grads = _host_backward(
                q, k, v, mu, omega, alpha, mask, S0, z0, out, gq, gk, den, g, dS, dz,
                num_threads=num_threads, S_end=S_end, z_end=z_end, **options,
            )
            grads = grads[:6] + (grads[6:] if has_state else ())
            return tuple(_to_mlx(x) for x in grads)

        @backward.vjp
        def _second_order(*_):
            raise NotImplementedError(
                "gmattn: second-order gradients of gma_attention (a gradient of its gradient) are not "
                "implemented for MLX"
            )

        @backward.jvp
        def _backward_jvp(*_):
            raise NotImplementedError(
                "gmattn: forward-mode derivatives of gma_attention's backward are not implemented"
            )

        return backward(*primals, *extra)

    @op.jvp
    def op_jvp(*_):
        raise NotImplementedError(
            "gmattn: forward-mode derivatives (mx.jvp) of gma_attention are not implemented for MLX; "
            "use mx.grad / mx.vjp"
        )

    @op.vmap
    def op_vmap(*_):
        raise NotImplementedError(
            "gmattn: mx.vmap over gma_attention is not implemented; it already takes a batch dimension B "
            "(and per-row masks): fold the mapped axis into B instead"
        )

    return op


def _require_mlx(name: str, x: Any) -> None:
    if x is not None:
        _checks.require_framework("gma_attention", f"'{name}'", x, "mlx", "like q; convert with mx.array")


BACKENDS = ("auto", "native", "core")
BACKEND_ENV = "GMATTN_MLX_BACKEND"
_backend_choice: Optional[str] = None  # set_backend's; None: the environment variable, else "auto"


def _check_backend(name: Any, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"gma_attention: {where} must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Chooses the implementation of gmattn.mlx.gma_attention for this process: "auto" (native on a
    GPU or under mx.compile / mx.vmap, else the core), "native" (MLX operations; every device and
    transformation) or "core" (the compiled CPU core; eager and mx.grad only). None goes back to
    the default (the GMATTN_MLX_BACKEND variable, else "auto")."""
    global _backend_choice
    _backend_choice = None if name is None else _check_backend(name, "set_backend's 'name'")


def get_backend() -> str:
    """The backend a call without ``backend=`` uses (see set_backend)."""
    if _backend_choice is not None:
        return _backend_choice
    import os

    env = os.environ.get(BACKEND_ENV)
    return "auto" if not env else _check_backend(env, f"the environment variable {BACKEND_ENV}")


def _auto_backend(arrays: Sequence[Any]) -> str:
    """"native" on a GPU-default device or when the inputs are traced (mx.compile / mx.vmap),
    "core" otherwise; see the module docstring."""
    if _default_device_is_gpu():
        return "native"
    try:
        mx.eval(*[a for a in arrays if a is not None])
    except ValueError as exc:
        if _transform_error(exc) is not None:       # MLX's answer for traced inputs
            return "native"
        raise
    return "core"


def gma_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    mu: mx.array,
    omega: mx.array,
    alpha: mx.array,
    *,
    causal: bool = False,
    key_padding_mask: Optional[mx.array] = None,
    initial_state: Optional[Tuple[mx.array, mx.array]] = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    sigma_eps: float = 1e-4,
    backend: Optional[str] = None,
    save_for_backward: bool = False,
    num_threads: int = 0,
    cu_seqlens: Optional[mx.array] = None,
):
    """Gaussian Mixture Attention on MLX arrays; see gmattn.gma_attention and the module docstring.

    MLX-only keywords:
        backend: "auto" (native on a GPU or under mx.compile / mx.vmap, else the core), "native"
            (MLX operations, lazy, every device and transformation) or "core" (the compiled CPU
            core); None = get_backend() (default "auto").
        save_for_backward (core backend): keep the responsibilities (2 B H N K + B H N floats) from
            the forward for the vjp. When False (default) the forward stores nothing (fastest for
            inference) and a gradient recomputes them with one extra forward pass. The layer sets it
            to ``self.training``. The native backend always hands its responsibilities to the vjp
            through the MLX graph (kept only while a gradient computation holds the graph).
        num_threads (core backend): OpenMP threads of the core; 0 = OpenMP's default
            (OMP_NUM_THREADS, else all cores). The native backend runs on MLX's own threads.
        cu_seqlens: packed sequences, as for gmattn.gma_attention. Both backends read the offsets
            on the host (an evaluation: not inside mx.compile / mx.vmap); the native backend then
            runs each sequence as its own call (a loop whose cost grows with the number of
            sequences), the core backend all of them in one call.
    """
    _require_mlx("q", q)
    for name, x in _checks.array_arguments(k, v, mu, omega, alpha, key_padding_mask, None, cu_seqlens):
        _require_mlx(name, x)
    dims = _checks.check_arguments(q, k, v, mu, omega, alpha, key_padding_mask, initial_state, eps, sigma_eps,
                                   cu_seqlens)
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = initial_state
        for name, x in zip(_checks.STATE_NAMES, initial_state):
            _require_mlx(name, x)
    if int(num_threads) < 0:
        raise ValueError(f"gma_attention: 'num_threads' must be >= 0 (0 = default), got {num_threads}")
    backend = get_backend() if backend is None else _check_backend(backend, "'backend'")
    if backend == "auto":
        backend = _auto_backend([q, k, v, mu, omega, alpha, key_padding_mask, S0, z0])
    core = backend == "core"
    if core:
        _warn_if_gpu_default()

    acc = getattr(mx, dims.accumulator)
    low_precision = dims.dtype in _LOW_PRECISION
    # The core's casts run on the CPU stream (its kernels are CPU kernels); the native path's run
    # wherever the caller's code runs.
    stream = _STREAM if core else None

    def cast(x):
        return x if x.dtype == acc else x.astype(acc, stream=stream)

    if low_precision:
        q, k, v = cast(q), cast(k), cast(v)
    mu, omega, alpha = cast(mu), cast(omega), cast(alpha)
    if S0 is not None:
        S0, z0 = cast(S0), cast(z0)
    offsets = None if cu_seqlens is None else _host_offsets(cu_seqlens)

    if core:
        out, S_final, z_final = _core_attention(
            q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, causal=bool(causal), eps=float(eps),
            sigma_eps=float(sigma_eps), return_state=bool(output_final_state), save=bool(save_for_backward),
            num_threads=int(num_threads), cu_seqlens=offsets,
        )
    elif offsets is not None:
        out, S_final, z_final = _native_packed(q, k, v, mu, omega, alpha, S0, z0, offsets, causal=bool(causal),
                                               eps=float(eps), sigma_eps=float(sigma_eps))
    else:
        mask = None if key_padding_mask is None else key_padding_mask.astype(mx.bool_)
        out, S_final, z_final = gma_attention_native(
            q, k, v, mu, omega, alpha, mask, S0, z0, causal=bool(causal), eps=float(eps), sigma_eps=float(sigma_eps)
        )
    if low_precision:
        out = out.astype(getattr(mx, dims.dtype), stream=stream)
    if output_final_state:
        return out, (S_final, z_final)
    return out


def _host_offsets(cu_seqlens: mx.array) -> np.ndarray:
    """The packed sequences' offsets as an int64 NumPy array (evaluates them: both backends plan on
    the host). Their values are checked by the core (core backend) or _native_packed."""
    try:
        _evaluate([cu_seqlens])
    except RuntimeError as exc:
        raise RuntimeError("gma_attention: 'cu_seqlens' (packed sequences) is read on the host, which is not "
                           "possible inside mx.compile / mx.vmap; call gma_attention with packed sequences "
                           "outside the compiled function") from exc
    return np.asarray(_host(cu_seqlens, "cu_seqlens"), dtype=np.int64)


def _native_packed(q, k, v, mu, omega, alpha, S0, z0, offsets: np.ndarray, *, causal, eps, sigma_eps):
    """The native backend on packed sequences: each sequence on its own, its outputs and states
    concatenated (the core backend runs them all in one call instead)."""
    N = q.shape[1]
    if offsets[0] != 0 or offsets[-1] != N or np.any(np.diff(offsets) < 0):
        raise ValueError(f"gma_attention: 'cu_seqlens' must run from 0 to N = {N} without decreasing, "
                         f"got {offsets.tolist()}")
    H, K, Dv = q.shape[2], mu.shape[1], v.shape[3]
    outs, S_ends, z_ends = [], [], []
    for s, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        S_s = None if S0 is None else S0[s:s + 1]
        z_s = None if z0 is None else z0[s:s + 1]
        if hi == lo:  # an empty sequence: its state passes through
            S_ends.append(mx.zeros((1, H, K, Dv), dtype=mu.dtype) if S_s is None else S_s)
            z_ends.append(mx.zeros((1, H, K), dtype=mu.dtype) if z_s is None else z_s)
            continue
        out, S_end, z_end = gma_attention_native(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mu, omega, alpha, None, S_s,
                                                 z_s, causal=causal, eps=eps, sigma_eps=sigma_eps)
        outs.append(out)
        S_ends.append(S_end)
        z_ends.append(z_end)
    return mx.concatenate(outs, axis=1), mx.concatenate(S_ends, axis=0), mx.concatenate(z_ends, axis=0)


def _core_attention(q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, *, causal, eps, sigma_eps, return_state,
                    save, num_threads, cu_seqlens=None):
    """The core backend on cast arguments; returns (out, S_final, z_final), the state None unless
    `return_state`."""
    mask = None
    if key_padding_mask is not None:
        _evaluate([key_padding_mask])
        mask = _host(key_padding_mask, "key_padding_mask")
    op = _build_op(mask, has_state=S0 is not None, causal=causal, eps=eps, sigma_eps=sigma_eps,
                   return_state=return_state, save=save, num_threads=num_threads, cu_seqlens=cu_seqlens)
    primals = [q, k, v, mu, omega, alpha] + ([S0, z0] if S0 is not None else [])
    result = op(*primals)
    if return_state:
        return result
    return result, None, None
