"""Fuzz of the compiled module's boundary (`gmattn._core.forward` / `backward`) and of the
front ends where they allocate before the core checks (issue 7, "Binding fuzz").

Whatever reaches the binding -- 0-dim arrays, wrong ranks, None, non-arrays, mismatched dtypes,
negative or zero strides, read-only buffers, lying DLPack producers, capsules that claim another
device or element counts that overflow 32/64-bit indices -- must either give the right answer
(inputs with negative/zero strides, legacy capsules, unaligned data) or raise a Python exception
whose message names the argument and the problem. Never a segfault, never a silent wrong answer,
never a write outside the outputs.

Cases that hand the binding hand-made DLPack capsules (ctypes structs that can claim anything),
or that map 24 GiB of sparse virtual memory, run in a child process, so a crash there fails
these tests instead of killing pytest.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gmattn import _ext
from gmattn.testing import UNDER_ADDRESS_SANITIZER

core = _ext.core()

# N = 70 crosses the kernels' 64-row chunk; every dimension > 1 so every stride matters.
B, N, H, K, D, Dv = 2, 70, 3, 4, 5, 6
EPS, SIGMA_EPS = 1e-6, 1e-4

FWD_INPUTS = ("q", "k", "v", "mu", "omega", "alpha", "mask", "S0", "z0")
FWD_OUTPUTS = ("out", "S_final", "z_final", "gq", "gk", "den")
BWD_INPUTS = FWD_INPUTS + ("out", "gq", "gk", "den", "dout", "dS_final", "dz_final")
BWD_OUTPUTS = ("dq", "dk", "dv", "dmu", "domega", "dalpha", "dS0", "dz0")
FWD_REQUIRED = ("q", "k", "v", "mu", "omega", "alpha", "out")
BWD_REQUIRED = ("q", "k", "v", "mu", "omega", "alpha", "out", "gq", "gk", "den", "dout",
                "dq", "dk", "dv", "dmu", "domega", "dalpha")
ARRAYS = {"forward": FWD_INPUTS + FWD_OUTPUTS, "backward": BWD_INPUTS + BWD_OUTPUTS}
OUTPUTS = {"forward": FWD_OUTPUTS, "backward": BWD_OUTPUTS}
REQUIRED = {"forward": FWD_REQUIRED, "backward": BWD_REQUIRED}
# q, v and mu are imported first (they fix B, N, H, D, Dv, K), so None there is "not an array".
READ_FIRST = ("q", "v", "mu")

# How the binding names each argument in its messages.
MSG_NAME = {"mask": "key_padding_mask", "S0": "initial_state[0] (S)", "z0": "initial_state[1] (z)"}


def msg_name(arg: str) -> str:
    return re.escape(MSG_NAME.get(arg, arg))


DEVICE_NAMES = {2: "CUDA", 3: "CUDA pinned host", 12: "extension-device", 14: "oneAPI"}


def wrong_device(arg: str, dev: int) -> str:
    """The binding's message for `arg` on DLPack device type `dev` (names the device either way)."""
    return (rf"'{msg_name(arg)}' must be on the CPU device for this module"
            rf"(, got a {re.escape(DEVICE_NAMES[dev])}| \(DLPack device type {dev}\))")


# ---------------------------------------------------------------------------------------------
# Valid arguments (NumPy), built once per dtype


def _acc(dtype) -> type:
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _nan(shape, dtype) -> np.ndarray:
    return np.full(shape, np.nan, dtype=dtype)


def _inputs(dtype=np.float64, seed=0, dims=(B, N, H, K, D, Dv)) -> dict:
    b, n, h, k, d, dv = dims
    rng = np.random.default_rng(seed)
    acc = _acc(dtype)

    def r(*shape, dt=dtype, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dt)

    mask = rng.random((b, n)) > 0.3
    mask[:, 0] = True
    return dict(q=r(b, n, h, d), k=r(b, n, h, d), v=r(b, n, h, dv), mu=r(h, k, d, dt=acc),
                omega=r(h, k, d, dt=acc, scale=0.5), alpha=r(h, k, dt=acc, scale=0.5), mask=mask,
                S0=rng.random((b, h, k, dv)).astype(acc), z0=(rng.random((b, h, k)) + 0.1).astype(acc))


def _fwd_outputs(dtype, dims=(B, N, H, K, D, Dv)) -> dict:
    b, n, h, k, d, dv = dims
    acc = _acc(dtype)
    return dict(out=_nan((b, n, h, dv), dtype), S_final=_nan((b, h, k, dv), acc), z_final=_nan((b, h, k), acc),
                gq=_nan((b, h, n, k), acc), gk=_nan((b, h, n, k), acc), den=_nan((b, h, n), acc))


def _bwd_outputs(dtype, dims=(B, N, H, K, D, Dv)) -> dict:
    b, n, h, k, d, dv = dims
    acc = _acc(dtype)
    return dict(dq=_nan((b, n, h, d), dtype), dk=_nan((b, n, h, d), dtype), dv=_nan((b, n, h, dv), dtype),
                dmu=_nan((h, k, d), acc), domega=_nan((h, k, d), acc), dalpha=_nan((h, k), acc),
                dS0=_nan((b, h, k, dv), acc), dz0=_nan((b, h, k), acc))


_SAVED: dict = {}


def forward_args(dtype=np.float64, **over) -> dict:
    a = {**_inputs(dtype), **_fwd_outputs(dtype)}
    a.update(over)
    return a


def backward_args(dtype=np.float64, **over) -> dict:
    key = np.dtype(dtype).name
    if key not in _SAVED:
        f = run("forward", forward_args(dtype))
        rng = np.random.default_rng(1)
        acc = _acc(dtype)
        _SAVED[key] = dict(out=f["out"], gq=f["gq"], gk=f["gk"], den=f["den"],
                           dout=rng.standard_normal((B, N, H, Dv)).astype(dtype),
                           dS_final=rng.standard_normal((B, H, K, Dv)).astype(acc),
                           dz_final=rng.standard_normal((B, H, K)).astype(acc))
    a = {**_inputs(dtype), **{k: v.copy() for k, v in _SAVED[key].items()}, **_bwd_outputs(dtype)}
    a.update(over)
    return a


def make_args(fn: str, dtype=np.float64, **over) -> dict:
    return forward_args(dtype, **over) if fn == "forward" else backward_args(dtype, **over)


def run(fn: str, args: dict, causal: bool = True, eps: float = EPS, sigma_eps: float = SIGMA_EPS,
        num_threads: int = 0) -> dict:
    getattr(core, fn)(**args, causal=causal, eps=eps, sigma_eps=sigma_eps, num_threads=num_threads)
    return args


def results(fn: str, args: dict) -> list:
    return [np.array(args[name].base if isinstance(args[name], Crafted) else args[name]) for name in OUTPUTS[fn]]


def assert_same_results(fn, got: dict, want: dict, what: str):
    for name in OUTPUTS[fn]:
        assert np.array_equal(np.asarray(got[name]), np.asarray(want[name])), f"{what}: '{name}' differs"
        assert np.isfinite(np.asarray(got[name])).all(), f"{what}: '{name}' has unwritten (NaN) elements"


def _baseline(fn, dtype=np.float64):
    return run(fn, make_args(fn, dtype))


CALL_ARRAYS = [(fn, name) for fn in ("forward", "backward") for name in ARRAYS[fn]]
CALL_INPUTS = [(fn, name) for fn, ins in (("forward", FWD_INPUTS), ("backward", BWD_INPUTS)) for name in ins]
CALL_OUTPUTS = [(fn, name) for fn in ("forward", "backward") for name in OUTPUTS[fn]]
CALL_REQUIRED = [(fn, name) for fn in ("forward", "backward") for name in REQUIRED[fn]]


def _ids(pairs):
    return [f"{fn}-{name}" for fn, name in pairs]


# ---------------------------------------------------------------------------------------------
# Ranks, None, non-arrays, dtypes


@pytest.mark.parametrize("fn,arg", CALL_ARRAYS, ids=_ids(CALL_ARRAYS))
def test_wrong_rank_and_zero_dim_rejected(fn, arg):
    good = make_args(fn)[arg]
    for variant, bad in (("0-dim", np.zeros((), good.dtype)), ("extra dim", good[None]), ("missing dim", good[0])):
        with pytest.raises(ValueError, match=rf"'{msg_name(arg)}' must have \d dimensions") as info:
            run(fn, make_args(fn, **{arg: bad}))
        assert str(tuple(bad.shape)) in str(info.value), f"{variant}: the message must show the shape given"


@pytest.mark.parametrize("fn,arg", CALL_REQUIRED, ids=_ids(CALL_REQUIRED))
def test_none_where_required(fn, arg):
    expect = "must be an array that supports DLPack .*got NoneType" if arg in READ_FIRST else "is required"
    with pytest.raises(ValueError, match=rf"'{msg_name(arg)}' {expect}"):
        run(fn, make_args(fn, **{arg: None}))


@pytest.mark.parametrize("fn,given,pattern", [
    ("forward", ("S0",), r"'initial_state' must give both S and z"),
    ("forward", ("z0",), r"'initial_state' must give both S and z"),
    ("forward", ("S_final",), r"'S_final' and z_final must be given together"),
    ("forward", ("z_final",), r"'S_final' and z_final must be given together"),
    ("forward", ("gq",), r"gk and den .* must be given together"),
    ("forward", ("gq", "gk"), r"gk and den .* must be given together"),
    ("forward", ("den",), r"gk and den .* must be given together"),
    ("backward", ("dS0",), r"dS0 and dz0 go together"),
    ("backward", ("dz0",), r"dS0 and dz0 go together"),
])
def test_optional_groups_all_or_nothing(fn, given, pattern):
    groups = {"S0": ("S0", "z0"), "z0": ("S0", "z0"), "S_final": ("S_final", "z_final"),
              "z_final": ("S_final", "z_final"), "gq": ("gq", "gk", "den"), "gk": ("gq", "gk", "den"),
              "den": ("gq", "gk", "den"), "dS0": ("dS0", "dz0"), "dz0": ("dS0", "dz0")}
    dropped = {name: None for name in groups[given[0]] if name not in given}
    with pytest.raises(ValueError, match=pattern):
        run(fn, make_args(fn, **dropped))


class _NoDLPack:
    shape = (B, N, H, D)
    dtype = np.float64


@pytest.mark.parametrize("fn,arg", CALL_ARRAYS, ids=_ids(CALL_ARRAYS))
def test_non_array_objects_rejected(fn, arg):
    for obj in ([[1.0, 2.0]], 1.5, 3, "q", {"a": 1}, object(), np.float64(1.0), _NoDLPack()):
        with pytest.raises(ValueError, match=rf"'{msg_name(arg)}' must be an array that supports DLPack"):
            run(fn, make_args(fn, **{arg: obj}))


FLOAT_ARRAYS = [(fn, name) for fn, name in CALL_ARRAYS if name != "mask"]


@pytest.mark.parametrize("fn,arg", FLOAT_ARRAYS, ids=_ids(FLOAT_ARRAYS))
def test_mismatched_dtype_rejected(fn, arg):
    good = make_args(fn)[arg]
    # The input dtype comes from q: a float32 q makes k the first argument out of line.
    named, want = ("k", "float32") if arg == "q" else (arg, "float64")
    with pytest.raises(ValueError, match=rf"'{msg_name(named)}' must be {want} \(inputs are {want}\), got float"):
        run(fn, make_args(fn, **{arg: good.astype(np.float32)}))
    for got in ("int32", "complex64", "uint8", "bool", "int64"):
        bad = np.zeros(good.shape, got)
        with pytest.raises(ValueError, match=rf"'{msg_name(arg)}' must be a floating tensor .*got {got}"):
            run(fn, make_args(fn, **{arg: bad}))


def test_half_precision_dtype_rules():
    """float16 inputs keep float32 parameters, state and saved tensors; anything else is named."""
    a = forward_args(np.float16, mu=_inputs(np.float32)["mu"])
    for arg in FWD_INPUTS + FWD_OUTPUTS:
        if arg in ("mask",):
            continue
        want = "float16" if arg in ("q", "k", "v", "out") else "float32"
        wrong = np.float32 if want == "float16" else np.float16
        with pytest.raises(ValueError, match=rf"'{msg_name(arg) if arg != 'q' else 'k'}' must be "):
            run("forward", {**a, arg: a[arg].astype(wrong)})
    out = run("forward", a)["out"]
    assert out.dtype == np.float16 and np.isfinite(out).all()


def test_bfloat16_dtype_rules_through_torch_tensors():
    torch = pytest.importorskip("torch")
    a = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in forward_args(np.float32).items()}
    for name in ("q", "k", "v", "out"):
        a[name] = a[name].bfloat16()
    with pytest.raises(ValueError, match=r"'k' must be bfloat16 \(inputs are bfloat16\), got float16"):
        run("forward", {**a, "k": a["k"].half()})
    with pytest.raises(ValueError, match=r"'mu' must be float32 \(inputs are bfloat16\), got bfloat16"):
        run("forward", {**a, "mu": a["mu"].bfloat16()})
    with pytest.raises(ValueError, match=r"'S_final' must be float32 \(inputs are bfloat16\), got bfloat16"):
        run("forward", {**a, "S_final": a["S_final"].bfloat16()})
    run("forward", a)
    assert torch.isfinite(a["out"].float()).all() and torch.isfinite(a["gq"]).all()


@pytest.mark.parametrize("bad", [np.float32, np.float64, np.int8, np.int32, np.uint16, np.float16])
def test_mask_dtype_must_be_bool_or_uint8(bad):
    mask = forward_args()["mask"]
    with pytest.raises(ValueError, match=rf"'key_padding_mask' must be bool \(or uint8\), got {np.dtype(bad).name}"):
        run("forward", forward_args(mask=mask.astype(bad)))


def test_bool_and_uint8_masks_agree():
    """Any non-zero uint8 is a real token; bool and uint8, NumPy and torch give identical results."""
    torch = pytest.importorskip("torch")
    mask = forward_args()["mask"]
    want = run("forward", forward_args(mask=mask))
    u8 = mask.astype(np.uint8) * np.array([1, 2, 7, 255], np.uint8)[np.arange(N) % 4]
    variants = {"uint8 0/1": mask.astype(np.uint8), "uint8 0/2/7/255": u8, "torch bool": torch.from_numpy(mask),
                "torch uint8": torch.from_numpy(u8), "bool from bytes 0/2": (u8 * 2).view(np.bool_)}
    for what, m in variants.items():
        assert_same_results("forward", run("forward", forward_args(mask=m)), want, what)
    # and the mask does something: dropping it changes the answer
    assert not np.array_equal(run("forward", forward_args(mask=None))["out"], want["out"])
    for what, m in (("uint8", mask.astype(np.uint8)), ("torch bool", torch.from_numpy(mask))):
        assert_same_results("backward", run("backward", backward_args(mask=m)),
                            run("backward", backward_args(mask=mask)), what)


# ---------------------------------------------------------------------------------------------
# Strides: negative and zero strides work on inputs, are refused on outputs


def _reversed_view(x: np.ndarray, axis: int) -> np.ndarray:
    """Same values as x, stored backwards along `axis` (a negative stride)."""
    v = np.flip(np.ascontiguousarray(np.flip(x, axis)), axis)
    assert v.strides[axis] < 0 and np.array_equal(v, x)
    return v


def _broadcast_view(x: np.ndarray, axis: int) -> np.ndarray:
    """x's first slice along `axis` repeated with stride 0 (read-only, as NumPy makes broadcasts)."""
    v = np.broadcast_to(np.take(x, [0], axis=axis), x.shape)
    assert v.strides[axis] == 0
    return v


@pytest.mark.parametrize("fn,arg", CALL_INPUTS, ids=_ids(CALL_INPUTS))
def test_negative_and_zero_stride_inputs_are_read_correctly(fn, arg):
    base = make_args(fn)
    want = run(fn, make_args(fn))
    x = base[arg]
    for axis in range(x.ndim):
        got = run(fn, make_args(fn, **{arg: _reversed_view(x, axis)}))
        assert_same_results(fn, got, want, f"'{arg}' reversed along axis {axis}")
    for axis in (0, x.ndim - 1):
        view = _broadcast_view(x, axis)
        got = run(fn, make_args(fn, **{arg: view}))
        ref = run(fn, make_args(fn, **{arg: np.ascontiguousarray(view)}))
        assert_same_results(fn, got, ref, f"'{arg}' broadcast along axis {axis}")


def _writable_zero_stride(shape, dtype, axis) -> np.ndarray:
    base = _nan(shape, dtype)
    strides = list(base.strides)
    strides[axis] = 0
    return np.lib.stride_tricks.as_strided(base, shape=shape, strides=strides, writeable=True)


@pytest.mark.parametrize("fn,arg", CALL_OUTPUTS, ids=_ids(CALL_OUTPUTS))
def test_unsafe_outputs_rejected(fn, arg):
    good = make_args(fn)[arg]
    shape, dtype = good.shape, good.dtype
    non_contiguous = {
        "negative stride": np.flip(_nan(shape, dtype), 0),
        "negative inner stride": np.flip(_nan(shape, dtype), -1),
        "zero stride": _writable_zero_stride(shape, dtype, 0),
        "zero inner stride": _writable_zero_stride(shape, dtype, len(shape) - 1),
        "Fortran order": np.asfortranarray(_nan(shape, dtype)),
        "step slice": _nan(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2],
        "permuted": np.ascontiguousarray(_nan(shape[::-1], dtype)).transpose(),
    }
    for what, bad in non_contiguous.items():
        assert bad.flags.writeable and not bad.flags.c_contiguous, what
        with pytest.raises(ValueError, match=rf"'{msg_name(arg)}' must be C-contiguous"):
            run(fn, make_args(fn, **{arg: bad}))
        assert np.isnan(bad).all(), f"{what}: a rejected output was written"
    read_only = _nan(shape, dtype)
    read_only.flags.writeable = False
    from_bytes = np.frombuffer(bytes(good.nbytes), dtype=dtype).reshape(shape)
    for what, bad in (("writeable=False", read_only), ("bytes-backed", from_bytes),
                      ("broadcast", np.broadcast_to(_nan((1,) + shape[1:], dtype), shape))):
        with pytest.raises(ValueError, match=rf"'{msg_name(arg)}' is read-only but is written by the kernel"):
            run(fn, make_args(fn, **{arg: bad}))
    assert not from_bytes.any()


# ---------------------------------------------------------------------------------------------
# Nothing is written outside the outputs


def _guarded(shape, dtype, guard=37):
    """A C-contiguous view into the middle of a NaN-filled buffer with `guard` elements either side."""
    n = int(np.prod(shape))
    buf = _nan(n + 2 * guard, dtype)
    return buf, buf[guard:guard + n].reshape(shape), guard


GUARD_SHAPES = [(1, 1, 1, 1, 1, 1), (2, 64, 3, 1, 2, 5), (1, 65, 2, 3, 1, 1), (2, 130, 1, 7, 3, 2)]


@pytest.mark.parametrize("dims", GUARD_SHAPES, ids=lambda s: "B{}N{}H{}K{}D{}Dv{}".format(*s))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_outputs_written_exactly_within_bounds(dims, dtype, causal):
    ins = _inputs(dtype, seed=sum(dims), dims=dims)
    plain_f = run("forward", {**ins, **_fwd_outputs(dtype, dims)}, causal=causal)
    bufs = {}
    guarded_f = dict(ins)
    for name, x in _fwd_outputs(dtype, dims).items():
        bufs[name] = _guarded(x.shape, x.dtype)
        guarded_f[name] = bufs[name][1]
    run("forward", guarded_f, causal=causal)
    rng = np.random.default_rng(3)
    saved = {name: plain_f[name] for name in ("out", "gq", "gk", "den")}
    grads_in = dict(dout=rng.standard_normal(plain_f["out"].shape).astype(dtype),
                    dS_final=rng.standard_normal(plain_f["S_final"].shape).astype(_acc(dtype)),
                    dz_final=rng.standard_normal(plain_f["z_final"].shape).astype(_acc(dtype)))
    plain_b = run("backward", {**ins, **saved, **grads_in, **_bwd_outputs(dtype, dims)}, causal=causal)
    guarded_b = {**ins, **saved, **grads_in}
    for name, x in _bwd_outputs(dtype, dims).items():
        bufs[name] = _guarded(x.shape, x.dtype)
        guarded_b[name] = bufs[name][1]
    run("backward", guarded_b, causal=causal)
    for name, (buf, interior, g) in bufs.items():
        assert np.isnan(buf[:g]).all() and np.isnan(buf[-g:]).all(), f"'{name}' wrote outside its bounds"
        want = (plain_f if name in FWD_OUTPUTS else plain_b)[name]
        assert np.array_equal(interior, want), f"'{name}' differs when placed inside a larger buffer"
        assert np.isfinite(interior).all(), f"'{name}' left elements unwritten"


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_low_precision_outputs_within_bounds_torch_storage_offset(tdtype):
    """Torch outputs that are views at a storage offset (DLPack byte_offset/data) in low precision."""
    torch = pytest.importorskip("torch")
    dt = getattr(torch, tdtype)
    a = {k: torch.from_numpy(v) for k, v in forward_args(np.float32).items()}
    for name in ("q", "k", "v"):
        a[name] = a[name].to(dt)
    g = 29
    bufs = {}
    for name in FWD_OUTPUTS:
        shape = a[name].shape
        n = a[name].numel()
        buf = torch.full((n + 2 * g,), float("nan"), dtype=dt if name == "out" else torch.float32)
        bufs[name] = (buf, buf.clone())
        a[name] = buf[g:g + n].view(shape)
        assert a[name].storage_offset() == g
    run("forward", a)
    for name, (buf, before) in bufs.items():
        assert torch.equal(buf[:g].view(torch.uint8), before[:g].view(torch.uint8)), f"'{name}' wrote before itself"
        assert torch.equal(buf[-g:].view(torch.uint8), before[-g:].view(torch.uint8)), f"'{name}' wrote after itself"
        assert torch.isfinite(a[name].float()).all(), f"'{name}' left elements unwritten"


# ---------------------------------------------------------------------------------------------
# Scalars


def test_scalar_arguments_validated():
    for kw, pattern in ((dict(eps=-1e-6), r"'eps' must be a non-negative number.*-0\.0000"),
                        (dict(eps=float("nan")), r"'eps' must be a non-negative number.*nan"),
                        (dict(sigma_eps=0.0), r"'sigma_eps' must be a positive number.*0\.0"),
                        (dict(sigma_eps=-1e-4), r"'sigma_eps' must be a positive number.*-0\.0001"),
                        (dict(sigma_eps=float("nan")), r"'sigma_eps' must be a positive number.*nan"),
                        (dict(num_threads=-1), r"'num_threads' must be >= 0"),
                        (dict(num_threads=-(2 ** 31)), r"'num_threads' must be >= 0")):
        for fn in ("forward", "backward"):
            with pytest.raises(ValueError, match=pattern):
                run(fn, make_args(fn), **kw)
    # not representable as the C++ parameter types: pybind refuses, naming the signature
    for kw in (dict(num_threads=2 ** 31), dict(num_threads=2 ** 70), dict(num_threads=2.5), dict(eps="1e-6"),
               dict(sigma_eps=None)):
        with pytest.raises(TypeError, match=r"incompatible function arguments"):
            run("forward", make_args("forward"), **kw)
    # huge but valid thread counts run: the kernels use no more threads than they make tasks
    # (cutting sequences into segments, so the sums' order and rounding change, not the result)
    # (bit-identical run to run at a fixed thread count; equal to rounding across thread counts)
    want = _baseline("forward")
    for threads in (1, 2 ** 31 - 1):
        got = run("forward", make_args("forward"), num_threads=threads)
        assert_same_results("forward", run("forward", make_args("forward"), num_threads=threads), got, "rerun")
        for name in OUTPUTS["forward"]:
            np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-12, atol=1e-14,
                                       err_msg=f"{threads} threads: '{name}'")
    # a huge but finite eps is a valid (if useless) choice: out = num / (den + eps) -> 0, finite
    out = run("forward", make_args("forward"), eps=1e300)["out"]
    assert np.isfinite(out).all() and np.abs(out).max() < 1e-290


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_or_overflowing_scalars_rejected(dtype):
    for kw, name in ((dict(sigma_eps=float("inf")), "sigma_eps"), (dict(eps=float("inf")), "eps"),
                     (dict(sigma_eps=1e39 if dtype == np.float32 else 1e309), "sigma_eps")):
        for fn in ("forward", "backward"):
            with pytest.raises(ValueError, match=rf"'{name}' must be"):
                run(fn, make_args(fn, dtype), **kw)


# ---------------------------------------------------------------------------------------------
# DLPack producers: what the binding trusts (the capsule's own DLTensor), and producers that fail


class _Wrap:
    """Forwards __dlpack__ to a real array; `device` is what __dlpack_device__ claims."""

    def __init__(self, x, device=(1, 0), legacy=False):
        self.x, self.device, self.legacy, self.calls = x, device, legacy, []

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, **kw):
        self.calls.append(sorted(kw))
        if self.legacy and "max_version" in kw:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        return self.x.__dlpack__(**kw)


def test_lying_dlpack_device_never_gives_a_wrong_answer():
    """__dlpack_device__ claiming CUDA over CPU data: refused naming the device (the binding asks
    __dlpack_device__ before exporting), or -- if only the capsule is consulted -- computed right
    from the capsule, whose DLTensor says CPU. Never anything else."""
    want = _baseline("forward")
    for arg in FWD_INPUTS + ("out",):
        for dev in (2, 3, 12):
            a = make_args("forward")
            a[arg] = _Wrap(a[arg], device=(dev, 0))
            try:
                run("forward", a)
            except ValueError as exc:
                assert re.search(wrong_device(arg, dev), str(exc)), str(exc)
                continue
            a[arg] = a[arg].x
            assert_same_results("forward", a, want, f"'{arg}' with a lying __dlpack_device__")
    # and claiming CPU for CPU data, with the device as a list, is fine
    a = make_args("forward")
    assert_same_results("forward", run("forward", {**a, "k": _Wrap(a["k"], device=[1, 0])}), want, "list device")


class _Device:
    """Real NumPy capsule; __dlpack_device__ returns (or raises) `dev`."""

    def __init__(self, x, dev):
        self.x, self.dev = x, dev

    def __dlpack_device__(self):
        if isinstance(self.dev, BaseException):
            raise self.dev
        return self.dev

    def __dlpack__(self, **kw):
        return self.x.__dlpack__(**kw)


MALFORMED_DEVICES = [None, "cpu", ("cpu", 0), (1.5, 0), (2 ** 70, 0), ()]


def test_malformed_dlpack_device_raises():
    """Whatever __dlpack_device__ returns or raises, the call raises a Python exception or, where
    the binding does not consult it, computes the right answer: never a crash."""
    want = _baseline("forward")
    for dev in MALFORMED_DEVICES + [RuntimeError("device query failed")]:
        a = make_args("forward")
        try:
            run("forward", {**a, "k": _Device(a["k"], dev)})
        except Exception as exc:  # noqa: BLE001 -- the type varies; a crash would not get here
            assert str(exc), f"{dev!r}: an exception without a message"
            if isinstance(dev, BaseException):
                assert "device query failed" in str(exc) or "device query failed" in str(exc.__cause__)
            continue
        assert_same_results("forward", a, want, f"__dlpack_device__ -> {dev!r}")


@pytest.mark.parametrize("dev", MALFORMED_DEVICES[:5], ids=repr)
def test_malformed_dlpack_device_names_the_argument(dev):
    a = make_args("forward")
    with pytest.raises((ValueError, TypeError), match=r"'k'.*__dlpack_device__"):
        run("forward", {**a, "k": _Device(a["k"], dev)})


def test_legacy_only_producer_falls_back():
    want = _baseline("forward")
    a = make_args("forward")
    wrapped = {name: _Wrap(a[name], legacy=True) for name in ("k", "mu", "mask", "S0")}
    assert_same_results("forward", run("forward", {**a, **wrapped}), want, "legacy producers")
    assert wrapped["k"].calls == [["max_version"], []], "the binding must try DLPack 1.x, then the legacy call"


class _Producer:
    def __init__(self, fn):
        self.fn = fn

    def __dlpack__(self, **kw):
        return self.fn()


def _capsule(name: bytes):
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.addressof(_DUMMY), name, None)


_DUMMY = ctypes.c_double(0.0)
_CAPSULE_NAMES = (b"used_dltensor", b"used_dltensor_versioned", b"dltensor_other")


def _raise(exc):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("arg", ["q", "k", "mask", "out"])
def test_misbehaving_producers_raise(arg):
    # not a capsule, or a capsule of another kind
    for what, fn in (("int", lambda: 3), ("None", lambda: None), ("array", lambda: np.zeros(3)),
                     *((n.decode(), (lambda n=n: _capsule(n))) for n in _CAPSULE_NAMES)):
        with pytest.raises(ValueError, match=rf"'{msg_name(arg)}' __dlpack__\(\) did not return a DLPack capsule"):
            run("forward", make_args("forward", **{arg: _Producer(fn)}))
    # the producer's own exception propagates unchanged, never swallowed or turned into a crash
    for exc in (RuntimeError("producer exploded"), BufferError("producer cannot export"),
                TypeError("producer rejects every call"), MemoryError("producer out of memory")):
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            run("forward", make_args("forward", **{arg: _Producer(_raise(exc))}))

    class NotCallable:
        __dlpack__ = None

    with pytest.raises(TypeError, match="not callable"):
        run("forward", make_args("forward", **{arg: NotCallable()}))


def test_producer_errors_name_the_argument():
    with pytest.raises(Exception, match=r"'k'") as info:
        run("forward", make_args("forward", k=_Producer(_raise(RuntimeError("producer exploded")))))
    assert "producer exploded" in str(info.value) or "producer exploded" in str(info.value.__cause__)


def test_torch_producer_errors():
    torch = pytest.importorskip("torch")
    a = {k: torch.from_numpy(v) for k, v in make_args("forward").items()}
    # torch refuses to describe or export meta tensors (BufferError from __dlpack__, ValueError from
    # __dlpack_device__, depending on which the binding asks first); either names 'meta'
    with pytest.raises((BufferError, ValueError), match="meta"):
        run("forward", {**a, "q": torch.empty(B, N, H, D, dtype=torch.float64, device="meta")})
    with pytest.raises((BufferError, ValueError), match="meta"):
        run("forward", {**a, "out": torch.empty(B, N, H, Dv, dtype=torch.float64, device="meta")})
    with pytest.raises((BufferError, RuntimeError), match="detach"):
        run("forward", {**a, "mu": a["mu"].clone().requires_grad_()})
    # Mixed producers are fine: DLPack is framework-neutral.
    want = _baseline("forward")
    mixed = {k: (v if k in ("q", "mu", "out") else v.numpy()) for k, v in a.items()}
    assert_same_results("forward", {k: np.asarray(v) for k, v in run("forward", mixed).items()}, want, "mixed")


def test_torch_negative_bit_views_through_front_end():
    """torch's __dlpack__ ignores the negative bit (x._neg_view(), or `.imag` of a conjugate), so the
    core alone would read -x as x; the custom op's dispatcher resolves the bit first."""
    torch = pytest.importorskip("torch")
    import gmattn
    from gmattn.reference import naive_gma

    a = {k: torch.from_numpy(v) for k, v in _inputs().items()}
    q = torch.complex(torch.zeros_like(a["q"]), -a["q"]).conj().imag  # == a["q"], stored negated
    assert q.is_neg() and torch.equal(q, a["q"])
    params = (a["mu"], a["omega"], a["alpha"])
    for causal in (False, True):
        got = gmattn.gma_attention(q, a["k"], a["v"], *params, causal=causal, key_padding_mask=a["mask"])
        want = naive_gma(a["q"], a["k"], a["v"], *params, causal=causal, key_padding_mask=a["mask"])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_overlapping_outputs_rejected():
    shared = _nan((B, H, N, K), np.float64)
    with pytest.raises(ValueError, match=r"overlap"):
        run("forward", forward_args(gq=shared, gk=shared), causal=False)
    assert np.isnan(shared).all()
    # in-place gradient: dq written over dout, which the reverse scan still reads (D != Dv here,
    # so share the memory through a flat buffer)
    a = backward_args()
    flat = np.full(max(a["dq"].size, a["dout"].size), np.nan)
    flat[:a["dout"].size] = a["dout"].ravel()
    with pytest.raises(ValueError, match=r"overlap"):
        run("backward", {**a, "dout": flat[:a["dout"].size].reshape(a["dout"].shape),
                         "dq": flat[:a["dq"].size].reshape(a["dq"].shape)})


# ---------------------------------------------------------------------------------------------
# Hand-made capsules and sparse memory: run in a child process (a crash must not kill pytest)


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_DL_CODES = {"float32": (2, 32), "float64": (2, 64), "uint8": (1, 8), "bool": (6, 8)}


class Crafted:
    """A DLPack producer that says whatever it is told: device, dtype, shape, strides, version,
    flags, data pointer. Memory is `base`'s (kept alive here); the capsule has no destructor."""

    def __init__(self, base: np.ndarray, shape=None, strides=None, *, code_bits=None, lanes=1, device=(1, 0),
                 version=(1, 0), flags=0, legacy=False, data="base", byte_offset=0, null_strides=False, claim=None):
        self.base = base
        if claim is not None:  # what __dlpack_device__ says, independently of the capsule
            self.__dlpack_device__ = lambda: claim
        shape = base.shape if shape is None else tuple(shape)
        strides = [s // base.itemsize for s in base.strides] if strides is None else list(strides)
        self._shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self._strides = (ctypes.c_int64 * max(len(strides), 1))(*strides)
        code, bits = _DL_CODES[base.dtype.name] if code_bits is None else code_bits
        ptr = base.ctypes.data if data == "base" else data
        t = DLTensor(data=ptr, device=DLDevice(*device), ndim=len(shape), dtype=DLDataType(code, bits, lanes),
                     shape=self._shape, strides=None if null_strides else self._strides, byte_offset=byte_offset)
        self.legacy = legacy
        if legacy:
            self._managed = DLManagedTensor(dl_tensor=t)
        else:
            self._managed = DLManagedTensorVersioned(version=DLPackVersion(*version), flags=flags, dl_tensor=t)

    def __dlpack__(self, **kw):
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        name = b"dltensor" if self.legacy else b"dltensor_versioned"
        return new(ctypes.addressof(self._managed), name, None)


I31 = 2 ** 31


def _zero(base, shape):
    """A crafted tensor of any shape over `base`'s first element (all strides 0): no memory."""
    return Crafted(base, shape=shape, strides=(0,) * len(shape))


def _accepts(fn, **over):
    """Runs with the crafted arguments; True when the results equal the plain call's."""
    return {"same": all(np.array_equal(a, b) for a, b in zip(results(fn, run(fn, make_args(fn, **over))),
                                                              results(fn, _baseline(fn))))}


def _crafted_cases() -> dict:
    """name -> (thunk, expectation). Expectation: a regex the error must match (with its type),
    or "same" when the call must succeed and equal the plain call."""
    f = forward_args()
    bw = backward_args()
    cases = {}

    def reject(name, fn, pattern, exc="ValueError", **over):
        cases[name] = ((lambda: run(fn, make_args(fn, **{k: v() for k, v in over.items()}))), (exc, pattern))

    def accept(name, fn, **over):
        cases[name] = ((lambda: _accepts(fn, **{k: v() for k, v in over.items()})), "same")

    # what the binding trusts: the DLTensor's device
    for arg in ("q", "k", "mu", "mask", "S0", "out", "gq"):
        for dev in (2, 3, 12, 14):
            reject(f"device{dev}-forward-{arg}", "forward", wrong_device(arg, dev),
                   **{arg: (lambda arg=arg, dev=dev: Crafted(f[arg], device=(dev, 0), data=None if dev == 2 else "base"))})
    for arg in ("dout", "dq", "dmu", "dS0"):
        reject(f"device2-backward-{arg}", "backward", wrong_device(arg, 2),
               **{arg: (lambda arg=arg: Crafted(bw[arg], device=(2, 0), data=None))})
    # __dlpack_device__ may claim CPU: the capsule's own DLTensor is what the binding trusts last
    for arg in ("q", "mask", "out"):
        reject(f"claims-cpu-capsule-cuda-{arg}", "forward", wrong_device(arg, 2),
               **{arg: (lambda arg=arg: Crafted(f[arg], device=(2, 0), data=None, claim=(1, 0)))})
    # protocol versions and flags
    reject("version-2.0", "forward", r"'k' was exported with an unsupported DLPack major version",
           k=lambda: Crafted(f["k"], version=(2, 0)))
    accept("version-1.9", "forward", k=lambda: Crafted(f["k"], version=(1, 9)))
    accept("legacy-capsule", "forward", q=lambda: Crafted(f["q"], legacy=True),
           out=lambda: Crafted(f["out"], legacy=True))
    accept("null-strides-compact", "forward", q=lambda: Crafted(f["q"], null_strides=True),
           gq=lambda: Crafted(f["gq"], null_strides=True))
    accept("byte-offset", "forward", v=lambda: Crafted(f["v"], data=f["v"].ctypes.data - 64, byte_offset=64),
           out=lambda: Crafted(f["out"], data=f["out"].ctypes.data - 24, byte_offset=24))
    accept("read-only-flag-on-inputs", "forward", q=lambda: Crafted(f["q"], flags=1),
           mask=lambda: Crafted(f["mask"], flags=1))
    for fn, args in (("forward", ("out", "S_final", "z_final", "gq", "gk", "den")),
                     ("backward", ("dq", "dk", "dv", "dmu", "domega", "dalpha", "dS0", "dz0"))):
        src = f if fn == "forward" else bw
        for arg in args:
            reject(f"read-only-flag-{fn}-{arg}", fn, rf"'{arg}' is read-only but is written by the kernel",
                   **{arg: (lambda arg=arg, src=src: Crafted(src[arg], flags=1))})
    for arg in ("q", "k", "mask", "out"):
        reject(f"null-data-{arg}", "forward", rf"'{msg_name(arg)}' has a null data pointer",
               **{arg: (lambda arg=arg: Crafted(f[arg], data=None))})

    def unaligned(x):
        raw = np.zeros(x.nbytes + 8, np.uint8)
        u = raw[3:3 + x.nbytes].view(x.dtype).reshape(x.shape)
        u[...] = x
        assert u.ctypes.data % 8 == 3
        return Crafted(u)

    accept("unaligned-data", "forward", q=lambda: unaligned(f["q"]), mu=lambda: unaligned(f["mu"]))
    # inputs are copied to aligned memory; an output cannot be, so it is refused
    reject("unaligned-output", "forward", r"'out' has data at an address that is not a multiple of its element size",
           out=lambda: unaligned(f["out"]))
    # dtypes only a hand-made capsule can claim
    for what, code_bits, lanes, shown in (("lanes2", (2, 64), 2, "float64x2"), ("float8", (2, 8), 1, "float8"),
                                          ("bfloat32", (4, 32), 1, "bfloat32"), ("opaque", (3, 64), 1, r"\?64")):
        for arg in ("q", "mu", "out"):
            reject(f"dtype-{what}-{arg}", "forward", rf"'{arg}' must be a floating tensor .*got {shown}",
                   **{arg: (lambda arg=arg, cb=code_bits, ln=lanes: Crafted(f[arg], code_bits=cb, lanes=ln))})
    reject("mask-uint16", "forward", r"'key_padding_mask' must be bool \(or uint8\), got uint16",
           mask=lambda: Crafted(f["mask"], code_bits=(1, 16)))
    reject("mask-bool-lanes4", "forward", r"'key_padding_mask' must be bool \(or uint8\), got boolx4",
           mask=lambda: Crafted(f["mask"], lanes=4))
    # shapes: negative, and element counts / offsets beyond 32- and 64-bit indices (no memory behind them)
    one = np.ones(1, np.float64)
    reject("negative-N", "forward", r"'q' must have a sequence length N >= 1",
           q=lambda: Crafted(f["q"], shape=(B, -N, H, D)))
    reject("negative-k-dim", "forward", r"'k' must have shape \(2, 70, 3, 5\), got \(2, 70, 3, -5\)",
           k=lambda: Crafted(f["k"], shape=(B, N, H, -D)))
    reject("N=2^31", "forward", r"'q' has a dimension larger than 2\^31-1", q=lambda: _zero(one, (1, I31, 1, 1)))
    reject("D=2^31", "forward", r"'q' has a dimension larger than 2\^31-1", q=lambda: _zero(one, (1, 1, 1, I31)))
    reject("B*H=2^31", "forward", r"'q' has a dimension larger than 2\^31-1",
           q=lambda: _zero(one, (2 ** 16, 1, 2 ** 15, 1)))
    reject("B=2^40", "forward", r"'q' has a dimension larger than 2\^31-1", q=lambda: _zero(one, (2 ** 40, 1, 1, 1)))
    reject("Dv=2^31", "forward", r"'v' has a dimension larger than 2\^31-1",
           q=lambda: _zero(one, (1, 1, 1, 1)), v=lambda: _zero(one, (1, 1, 1, I31)))
    reject("K=2^31", "forward", r"'mu' has a dimension larger than 2\^31-1",
           q=lambda: _zero(one, (1, 1, 1, 1)), v=lambda: _zero(one, (1, 1, 1, 1)), mu=lambda: _zero(one, (1, I31, 1)))
    reject("numel>2^63-q", "forward", r"'q' has more elements than fit in a 64-bit index",
           q=lambda: _zero(one, (2 ** 30, 2 ** 30, 1, 2 ** 30)))
    reject("numel>2^63-v", "forward", r"'v' has more elements than fit in a 64-bit index",
           q=lambda: _zero(one, (2 ** 30, 2 ** 30, 1, 1)), k=lambda: _zero(one, (2 ** 30, 2 ** 30, 1, 1)),
           v=lambda: _zero(one, (2 ** 30, 2 ** 30, 1, I31 - 1)))
    reject("B*H-wraps-int64", "forward", r"'q' has (more elements than fit in a 64-bit index|a dimension larger)",
           q=lambda: _zero(one, (2 ** 33, 1, I31 - 1, 1)))
    for arg, strides in (("k", (0, 2 ** 62, 0, 1)), ("k", (0, -(2 ** 62), 0, 1)), ("q", (2 ** 61, 2 ** 61, 0, 1)),
                         ("mask", (2 ** 62, 1)), ("mu", (0, 0, 2 ** 62))):
        reject(f"stride-overflow-{arg}-{strides}", "forward",
               rf"'{msg_name(arg)}' has strides whose offsets overflow a 64-bit index",
               **{arg: (lambda arg=arg, s=strides: Crafted(f[arg], strides=s))})
    cases["offsets-beyond-32-bit"] = (_offsets_beyond_32_bits, "same")
    return cases


def _offsets_beyond_32_bits():
    """Inputs whose element offsets pass 2^31 and 2^32 (signed and unsigned 32-bit wrap), backed by a
    24 GiB sparse anonymous mapping of which a few pages are touched. A kernel that truncated an
    offset to 32 bits would read another element (or fault)."""
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000)
    try:
        mm = mmap.mmap(-1, 25 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve)
    except (OSError, ValueError, OverflowError) as exc:  # no such address space here
        return {"skip": f"cannot map 25 GiB sparse: {exc}"}
    mem = np.frombuffer(mm, np.float32)
    b, n, h, k, d, dv = 2, 2, 1, 3, 4, 5
    sn, sb = I31 + 16, 2 ** 32 + 32  # element strides of rows and batches, in float32 elements

    def strided(offset, shape, strides):
        """float32 view starting `offset` elements into the mapping, strides in elements."""
        return np.lib.stride_tricks.as_strided(mem[offset:], shape=shape, strides=[s * 4 for s in strides])

    rng = np.random.default_rng(5)
    views = {}
    for i, (name, last) in enumerate((("q", d), ("k", d), ("v", dv))):
        x = strided(16 * i, (b, n, h, last), (sb, sn, 0, 1))
        x[...] = rng.standard_normal((b, n, h, last)).astype(np.float32)
        views[name] = x
    # uint8 mask in the same mapping: its element strides are 4x larger (bytes)
    mask_raw = np.frombuffer(mm, np.uint8, offset=64 * 4)
    mask = np.lib.stride_tricks.as_strided(mask_raw, shape=(b, n), strides=(sb * 4, sn * 4))
    mask[...] = np.array([[1, 0], [1, 1]], np.uint8)
    # An offset truncated to 32 bits lands elsewhere: 2^31 + 16 wraps negative (outside the mapping,
    # a fault) or, unsigned, on untouched zeros; 2^32 + 32 wraps onto v's first row. Either differs.
    offsets = [bi * sb + ni * sn for bi in range(b) for ni in range(n)]
    assert max(offsets) > 2 ** 32 and any(I31 < o < 2 ** 32 for o in offsets)
    params = dict(mu=rng.standard_normal((h, k, d)).astype(np.float32),
                  omega=rng.standard_normal((h, k, d)).astype(np.float32) * 0.5,
                  alpha=rng.standard_normal((h, k)).astype(np.float32))
    same = True
    for causal in (False, True):
        outs = []
        for src in (views, {name: np.ascontiguousarray(x) for name, x in views.items()}):
            m = mask if src is views else np.ascontiguousarray(mask)
            out = _nan((b, n, h, dv), np.float32)
            core.forward(src["q"], src["k"], src["v"], params["mu"], params["omega"], params["alpha"], m, None, None,
                         out, None, None, None, None, None, causal=causal, eps=EPS, sigma_eps=SIGMA_EPS)
            outs.append(out)
        # and reversed rows: negative strides of -(2^31 + 16) elements
        rev = {name: x[:, ::-1] for name, x in views.items()}
        out_rev = _nan((b, n, h, dv), np.float32)
        core.forward(rev["q"], rev["k"], rev["v"], params["mu"], params["omega"], params["alpha"], mask[:, ::-1],
                     None, None, out_rev, None, None, None, None, None, causal=causal, eps=EPS, sigma_eps=SIGMA_EPS)
        out_rev_ref = _nan((b, n, h, dv), np.float32)
        core.forward(*(np.ascontiguousarray(rev[name]) for name in ("q", "k", "v")), params["mu"], params["omega"],
                     params["alpha"], np.ascontiguousarray(mask[:, ::-1]), None, None, out_rev_ref, None, None, None,
                     None, None, causal=causal, eps=EPS, sigma_eps=SIGMA_EPS)
        same &= bool(np.array_equal(outs[0], outs[1]) and np.isfinite(outs[0]).all())
        same &= bool(np.array_equal(out_rev, out_rev_ref) and np.isfinite(out_rev).all())
    del views, mask, mask_raw, mem
    return {"same": same}


def _child_main(names):
    """Runs the named crafted cases, one JSON line each; a 'start' line first so a crash is located."""
    cases = _crafted_cases()
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        thunk, _ = cases[name]
        try:
            res = thunk()
            line = {"case": name, "exc": None, "result": res if isinstance(res, dict) else None}
        except Exception as exc:  # noqa: BLE001 -- recorded and judged by the parent
            line = {"case": name, "exc": type(exc).__name__, "msg": str(exc)}
        print(json.dumps(line), flush=True)


_CHILD = (
    "import importlib.util, json, sys\n"
    "spec = importlib.util.spec_from_file_location('gmattn_binding_fuzz_child', sys.argv[1])\n"
    "m = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(m)\n"
    "m._child_main(json.loads(sys.argv[2]))\n"
)

CRAFTED = list(_crafted_cases())


@pytest.fixture(scope="module")
def crafted_results():
    proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(__file__), json.dumps(CRAFTED)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [x["start"] for x in lines if "start" in x]
    done = {x["case"]: x for x in lines if "case" in x}
    return proc, started, done


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_capsules(crafted_results, name):
    proc, started, done = crafted_results
    if name not in done:
        crashed = started[-1] if started else "(before the first case)"
        pytest.fail(f"the child process died (exit {proc.returncode}, a signal if negative) in case {crashed!r}; "
                    f"stderr:\n{proc.stderr[-3000:]}")
    res = done[name]
    _, expect = _crafted_cases_expectation(name)
    if expect == "same":
        assert res["exc"] is None, f"{name}: raised {res['exc']}: {res.get('msg')}"
        if "skip" in (res["result"] or {}):
            pytest.skip(res["result"]["skip"])
        assert res["result"]["same"], f"{name}: silently wrong answer"
    else:
        exc, pattern = expect
        assert res["exc"] == exc, f"{name}: expected {exc}, got {res['exc']}: {res.get('msg')}"
        assert re.search(pattern, res["msg"]), f"{name}: message {res['msg']!r} does not match {pattern!r}"


_EXPECT: dict = {}


def _crafted_cases_expectation(name):
    if not _EXPECT:
        _EXPECT.update(_crafted_cases())
    return _EXPECT[name]


def test_child_process_exits_cleanly(crafted_results):
    proc, started, done = crafted_results
    assert proc.returncode == 0, f"child exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    assert set(done) == set(CRAFTED)


# ---------------------------------------------------------------------------------------------
# Front ends: a shape the kernels cannot index must be refused before outputs are allocated


_FRONT_END_CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # an 8 GiB output cannot be allocated
import numpy as np, gmattn
from numpy.lib.stride_tricks import as_strided
one = np.ones(1, np.float32)
big = lambda *shape: as_strided(one, shape=shape, strides=(0,) * len(shape))
N = 2 ** 31
try:
    gmattn.gma_attention(big(1, N, 1, 1), big(1, N, 1, 1), big(1, N, 1, 1), big(1, 1, 1), big(1, 1, 1), big(1, 1))
except Exception as exc:
    print(type(exc).__name__ + ": " + str(exc))
"""


@pytest.mark.skipif(UNDER_ADDRESS_SANITIZER, reason="measures memory, which AddressSanitizer distorts")
def test_front_end_refuses_unindexable_shape_before_allocating():
    proc = subprocess.run([sys.executable, "-c", _FRONT_END_CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.match(r"ValueError: .*N.*2\^31", proc.stdout), proc.stdout
