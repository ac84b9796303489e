"""MLX front end: parity with the torch front end, gradients, layer, training, errors, copies.

The whole module is skipped when MLX is not installed (CI installs `mlx[cpu]` on Linux).
"""

from __future__ import annotations

import ctypes
import math
import warnings

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
optim = pytest.importorskip("mlx.optimizers")

import gmattn  # noqa: E402
from gmattn import testing  # noqa: E402
from gmattn.mlx import GaussianMixtureAttention, gma_attention  # noqa: E402
from gmattn.mlx import ops as mlx_ops  # noqa: E402

ARGNAMES = ("q", "k", "v", "mu", "omega", "alpha", "S0", "z0")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def make_problem(B=2, N=13, H=3, D=5, Dv=4, K=6, seed=0, dtype=np.float32):
    """NumPy arrays of one problem: inputs, parameters, mask (with padded tails), state, cotangents."""
    rng = np.random.default_rng(seed)
    p = {
        "q": rng.standard_normal((B, N, H, D)) * 0.7,
        "k": rng.standard_normal((B, N, H, D)) * 0.7,
        "v": rng.standard_normal((B, N, H, Dv)),
        "mu": rng.standard_normal((H, K, D)) * 0.6,
        "omega": rng.standard_normal((H, K, D)) * 0.3 + 0.5,
        "alpha": rng.standard_normal((H, K)) * 0.5,
        "S0": rng.standard_normal((B, H, K, Dv)),
        "z0": rng.uniform(0.5, 2.0, (B, H, K)),
        "g_out": rng.standard_normal((B, N, H, Dv)),
        "g_S": rng.standard_normal((B, H, K, Dv)),
        "g_z": rng.standard_normal((B, H, K)),
    }
    p = {name: a.astype(dtype) for name, a in p.items()}
    mask = np.ones((B, N), dtype=bool)
    mask[0, N - 3:] = False
    mask[-1, :2] = False
    p["mask"] = mask
    return p


def mlx_run(p, causal, with_extras, dtype=mx.float32, save=False, param_dtype=None):
    """Outputs, final state and gradients of all differentiable arguments, through mx.value_and_grad.
    q, k, v in `dtype`; mu, omega, alpha in `param_dtype` (default: `dtype`)."""
    host = mx.float64 if dtype == mx.float64 else mx.float32  # mx.array(float64 ndarray) alone is float32
    param_dtype = dtype if param_dtype is None else param_dtype
    args = [mx.array(p[n], dtype=host).astype(dtype if n in "qkv" else param_dtype) for n in ARGNAMES[:6]]
    if with_extras:
        args += [mx.array(p["S0"], dtype=host), mx.array(p["z0"], dtype=host)]
    mask = mx.array(p["mask"]) if with_extras else None
    g_out, g_S, g_z = (mx.array(p[n], dtype=host) for n in ("g_out", "g_S", "g_z"))
    results = {}

    def loss(*a):
        state = (a[6], a[7]) if with_extras else None
        out, (S, z) = gma_attention(*a[:6], causal=causal, key_padding_mask=mask, initial_state=state,
                                    output_final_state=True, save_for_backward=save)
        results.update(out=out, S=S, z=z)
        o = out if out.dtype == mx.float64 else out.astype(mx.float32)
        return (o * g_out.astype(o.dtype)).sum() + (S * g_S.astype(S.dtype)).sum() + (z * g_z.astype(z.dtype)).sum()

    value, grads = mx.value_and_grad(loss, argnums=tuple(range(len(args))))(*args)
    mx.eval(value, grads, results)
    res = {n: np.array(results[n].astype(mx.float32) if results[n].dtype != mx.float64 else results[n])
           for n in ("out", "S", "z")}
    res["loss"] = float(value.item())
    for name, g in zip(ARGNAMES, grads):
        res["d" + name] = g
    return res


def torch_run(p, causal, with_extras, impl="op", low=None):
    """The same through the torch front end (impl="op"), the float64 naive reference (impl="naive")
    or plain PyTorch on `low` (16-bit) q, k, v with float32 parameters (impl="plain")."""
    import torch

    from conftest import plain_mixed_precision
    from gmattn import reference
    from gmattn.torch import gma_attention as torch_gma

    dtype = torch.float64 if impl == "naive" else torch.float32
    t = {n: torch.tensor(p[n], dtype=dtype, requires_grad=True) for n in ARGNAMES}
    if impl == "plain":
        t.update({n: t[n].detach().to(low).requires_grad_() for n in "qkv"})
    mask = torch.tensor(p["mask"]) if with_extras else None
    state = (t["S0"], t["z0"]) if with_extras else None
    fn = {"naive": reference.naive_gma, "op": torch_gma, "plain": plain_mixed_precision(reference.naive_gma)}[impl]
    out, (S, z) = fn(t["q"], t["k"], t["v"], t["mu"], t["omega"], t["alpha"], causal=causal, key_padding_mask=mask,
                     initial_state=state, output_final_state=True)
    loss = ((out.to(dtype) * torch.tensor(p["g_out"], dtype=dtype)).sum()
            + (S * torch.tensor(p["g_S"], dtype=dtype)).sum() + (z * torch.tensor(p["g_z"], dtype=dtype)).sum())
    loss.backward()
    res = {"out": out.detach().to(dtype).numpy(), "S": S.detach().numpy(), "z": z.detach().numpy(),
           "loss": float(loss.detach())}
    for n in ARGNAMES[: 8 if with_extras else 6]:
        res["d" + n] = t[n].grad.to(dtype).numpy()
    return res


def assert_close(a, b, tol, what):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    err = np.max(np.abs(a - b) / (1.0 + np.abs(b)))
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e}"


def dlpack_address(a) -> int:
    """Address of the first element of an mx.array as MLX itself exports it (DLPack)."""
    capsule = a.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    tensor = get(capsule, b"dltensor")  # DLManagedTensor*, whose first member is the DLTensor
    data = ctypes.c_void_p.from_address(tensor).value
    byte_offset = ctypes.c_uint64.from_address(tensor + 40).value
    return data + byte_offset


# ----------------------------------------------------------------------------------------------
# parity and correctness
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "mask+state"])
def test_parity_with_torch_front_end(causal, with_extras):
    pytest.importorskip("torch")
    p = make_problem(seed=1 + causal + 2 * with_extras)
    got = mlx_run(p, causal, with_extras)
    ref = torch_run(p, causal, with_extras)
    for name in ("out", "S", "z"):
        assert_close(got[name], ref[name], 1e-5, name)
    names = ARGNAMES[: 8 if with_extras else 6]
    for name in names:
        assert got["d" + name].dtype == mx.float32
        assert_close(np.array(got["d" + name]), ref["d" + name], 1e-5, "d" + name)
    if with_extras:  # the mask and the state really changed something
        plain = mlx_run(p, causal, False)
        assert np.max(np.abs(plain["out"] - got["out"])) > 1e-2


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_float64_against_naive_reference(causal):
    pytest.importorskip("torch")
    p = make_problem(B=2, N=9, H=2, D=3, Dv=4, K=5, seed=7, dtype=np.float64)
    got = mlx_run(p, causal, True, dtype=mx.float64)
    ref = torch_run(p, causal, True, impl="naive")
    for name in ("out", "S", "z"):
        assert_close(got[name], ref[name], 1e-10, name)
    for name in ARGNAMES:
        assert got["d" + name].dtype == mx.float64
        assert_close(np.array(got["d" + name]), ref["d" + name], 1e-9, "d" + name)


def test_saved_and_recomputed_backward_agree():
    p = make_problem(seed=3)
    saved = mlx_run(p, True, True, save=True)
    recomputed = mlx_run(p, True, True, save=False)
    for name in ("out", "S", "z") + tuple("d" + n for n in ARGNAMES):
        np.testing.assert_array_equal(np.array(saved[name]), np.array(recomputed[name]), err_msg=name)


def test_grad_value_and_grad_and_vjp_agree():
    p = make_problem(seed=4)
    q, k, v, mu, omega, alpha = (mx.array(p[n]) for n in ARGNAMES[:6])
    g = mx.array(p["g_out"])

    def f(q, mu):
        return (gma_attention(q, k, v, mu, omega, alpha, causal=True) * g).sum()

    dq, dmu = mx.grad(f, argnums=(0, 1))(q, mu)
    value, (dq2, dmu2) = mx.value_and_grad(f, argnums=(0, 1))(q, mu)
    outs, vjps = mx.vjp(lambda q, mu: gma_attention(q, k, v, mu, omega, alpha, causal=True), [q, mu], [g])
    assert abs(value.item() - (outs[0] * g).sum().item()) < 1e-4
    for a, b, c in ((dq, dq2, vjps[0]), (dmu, dmu2, vjps[1])):
        np.testing.assert_array_equal(np.array(a), np.array(b))
        np.testing.assert_array_equal(np.array(a), np.array(c))
    assert float(mx.abs(dmu).max().item()) > 0


def test_top_level_dispatch_returns_mx_array():
    p = make_problem(seed=5)
    args = [mx.array(p[n]) for n in ARGNAMES[:6]]
    out, (S, z) = gmattn.gma_attention(*args, causal=True, output_final_state=True)
    assert isinstance(out, mx.array) and isinstance(S, mx.array) and isinstance(z, mx.array)
    np.testing.assert_array_equal(np.array(out), np.array(gma_attention(*args, causal=True)))
    from gmattn import numpy_ops

    ref = numpy_ops.gma_attention(*(p[n] for n in ARGNAMES[:6]), causal=True)
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-6, atol=1e-6)


def test_split_resume_with_state():
    """Two halves with the state handed across equal one run, gradients included."""
    p = make_problem(B=2, N=16, seed=6)
    q, k, v, mu, omega, alpha = (mx.array(p[n]) for n in ARGNAMES[:6])

    def whole(mu):
        return gma_attention(q, k, v, mu, omega, alpha, causal=True)

    def halves(mu):
        a, state = gma_attention(q[:, :7], k[:, :7], v[:, :7], mu, omega, alpha, causal=True,
                                 output_final_state=True)
        b = gma_attention(q[:, 7:], k[:, 7:], v[:, 7:], mu, omega, alpha, causal=True, initial_state=state)
        return mx.concatenate([a, b], axis=1)

    np.testing.assert_allclose(np.array(halves(mu)), np.array(whole(mu)), rtol=1e-5, atol=1e-6)
    g = mx.array(p["g_out"][:, :16])
    d1 = mx.grad(lambda m: (whole(m) * g).sum())(mu)
    d2 = mx.grad(lambda m: (halves(m) * g).sum())(mu)
    np.testing.assert_allclose(np.array(d2), np.array(d1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_upcast_and_cast_back(dtype):
    p = make_problem(seed=8)
    low = getattr(mx, dtype)
    got = mlx_run(p, True, True, dtype=low)
    # parameters in low precision too: up-cast at the boundary, gradients come back in their dtype
    for name in ("dq", "dk", "dv", "dmu", "domega", "dalpha"):
        assert got[name].dtype == low, name
    assert got["dS0"].dtype == mx.float32  # the state is float32 whatever the input dtype
    q, k, v = (mx.array(p[n]).astype(low) for n in "qkv")
    out, (S, z) = gma_attention(q, k, v, *(mx.array(p[n]) for n in ("mu", "omega", "alpha")), causal=True,
                                output_final_state=True)
    assert out.dtype == low and S.dtype == mx.float32 and z.dtype == mx.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_low_precision_within_pytorch_error(dtype, causal):
    """16-bit q, k, v with float32 parameters and state: every output and gradient against float64
    on the same values, within 2x (3x for gradients) of plain PyTorch's error given the same inputs
    (as in tests/test_core.py). Measured: every gradient and out 0.99-1.00x (the rounding of out
    and of the 16-bit dout dominates both), the float32 state 0.6-2.5x of a float32-level error
    (2e-7 of its scale), where LOW_PRECISION_STATE_FLOOR decides."""
    torch = pytest.importorskip("torch")
    from conftest import LOW_PRECISION_STATE_FLOOR

    p = make_problem(B=2, N=70, H=2, D=8, Dv=8, K=8, seed=15)
    low = getattr(mx, dtype)
    got = mlx_run(p, causal, True, dtype=low, param_dtype=mx.float32)
    # the values the kernel was given: q, k, v rounded to 16 bits
    exact = {n: (np.array(mx.array(p[n]).astype(low).astype(mx.float32)) if n in "qkv" else p[n]) for n in p}
    ref = torch_run(exact, causal, True, impl="naive")
    plain = torch_run(exact, causal, True, impl="plain", low=getattr(torch, dtype))
    low_names = ("out", "dq", "dk", "dv")
    for name in ("out", "S", "z") + tuple("d" + n for n in ARGNAMES):
        a = got[name]
        if isinstance(a, mx.array):
            assert a.dtype == (low if name in low_names else mx.float32), f"{name}: dtype {a.dtype}"
            a = np.array(a.astype(mx.float32))
        ours = np.max(np.abs(a.astype(np.float64) - ref[name]))
        theirs = np.max(np.abs(plain[name].astype(np.float64) - ref[name]))
        factor = 3 if name.startswith("d") else 2
        floor = LOW_PRECISION_STATE_FLOOR * np.max(np.abs(ref[name])) if name in ("S", "z") else 0.0
        assert ours <= factor * theirs + floor, f"{name}: error {ours:.3e} vs plain PyTorch {theirs:.3e}"


def test_strided_inputs_are_read_in_place(monkeypatch):
    """Inputs reach the core as views of MLX's own memory (no copy), strided views included."""
    p = make_problem(seed=9)
    B, N, H, D = p["q"].shape
    packed = mx.array(np.concatenate([p["q"], p["k"]], axis=-1))  # (B, N, H, 2D): q and k are strided slices
    q, k = packed[..., :D], packed[..., D:]
    v, mu, omega, alpha = (mx.array(p[n]) for n in ("v", "mu", "omega", "alpha"))
    mx.eval(q, k)
    seen = {}
    real_core = gmattn._ext.core()

    class Spy:
        def forward(self, *args, **kwargs):
            seen.update(q=args[0], k=args[1], v=args[2], mu=args[3])
            return real_core.forward(*args, **kwargs)

    monkeypatch.setattr(mlx_ops._ext, "core", lambda: Spy())
    out = gma_attention(q, k, v, mu, omega, alpha)
    mx.eval(out)
    base = dlpack_address(packed)
    assert seen["q"].ctypes.data == base  # the slice, read in place
    assert seen["k"].ctypes.data == base + D * 4
    assert seen["q"].strides == (N * H * 2 * D * 4, H * 2 * D * 4, 2 * D * 4, 4)
    assert seen["v"].ctypes.data == dlpack_address(v)
    assert seen["mu"].ctypes.data == dlpack_address(mu)
    ref = gma_attention(mx.array(p["q"]), mx.array(p["k"]), v, mu, omega, alpha)
    np.testing.assert_array_equal(np.array(out), np.array(ref))


# ----------------------------------------------------------------------------------------------
# transformations
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def core_backend(monkeypatch):
    """The compiled-core backend for every call without backend= (the default "auto" takes the
    native backend under mx.compile / mx.vmap and on a GPU; these tests are about the core's own
    behaviour there; tests/test_mlx_native.py covers the native backend and the dispatch)."""
    monkeypatch.setenv(mlx_ops.BACKEND_ENV, "core")


def test_compile_raises_clear_error_and_surrounding_code_compiles(core_backend):
    p = make_problem(seed=10)
    q, k, v, mu, omega, alpha = (mx.array(p[n]) for n in ARGNAMES[:6])
    with pytest.raises(RuntimeError, match="mx.compile"):
        mx.compile(lambda q: gma_attention(q, k, v, mu, omega, alpha))(q)
    # compiling the code before and after the op works
    pre = mx.compile(lambda x: mx.tanh(x) * 2.0)
    post = mx.compile(lambda y: (y * y).sum())
    compiled = post(gma_attention(pre(q), k, v, mu, omega, alpha))
    eager = ((gma_attention(mx.tanh(q) * 2.0, k, v, mu, omega, alpha)) ** 2).sum()
    assert abs(compiled.item() - eager.item()) <= 1e-5 * abs(eager.item())


def test_unsupported_transformations_raise(core_backend):
    p = make_problem(seed=11)
    q, k, v, mu, omega, alpha = (mx.array(p[n]) for n in ARGNAMES[:6])
    f = lambda q: gma_attention(q, k, v, mu, omega, alpha)  # noqa: E731
    with pytest.raises(RuntimeError, match="vmap"):
        mx.vmap(f)(q[None])
    with pytest.raises(NotImplementedError, match="jvp"):
        mx.jvp(f, [q], [q])
    with pytest.raises(NotImplementedError, match="second-order"):
        mx.grad(lambda q: mx.grad(lambda x: f(x).sum())(q).sum())(q)


def test_gpu_default_device_runs_on_cpu_and_warns_once(monkeypatch, core_backend):
    """Mocked: what happens on a Mac whose MLX default device is the GPU."""
    p = make_problem(seed=12)
    args = [mx.array(p[n]).astype(mx.bfloat16) if n in "qkv" else mx.array(p[n]) for n in ARGNAMES[:6]]
    expected = gma_attention(*args, causal=True)
    expected_grad = mx.grad(lambda q: gma_attention(q, *args[1:], causal=True).astype(mx.float32).sum())(args[0])
    monkeypatch.setattr(mlx_ops, "_default_device_is_gpu", lambda: True)
    monkeypatch.setattr(mlx_ops, "_gpu_warning_issued", False)
    assert mlx_ops._STREAM == mx.cpu
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gma_attention(*args, causal=True)
        grad = mx.grad(lambda q: gma_attention(q, *args[1:], causal=True).astype(mx.float32).sum())(args[0])
        gma_attention(*args)
    gpu_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning) and "GPU" in str(w.message)]
    assert len(gpu_warnings) == 1
    assert "CPU" in str(gpu_warnings[0].message)
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)), np.array(expected.astype(mx.float32)))
    np.testing.assert_array_equal(np.array(grad.astype(mx.float32)), np.array(expected_grad.astype(mx.float32)))


# ----------------------------------------------------------------------------------------------
# bad input, poisoned outputs
# ----------------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    p = make_problem(seed=13)
    q, k, v, mu, omega, alpha = (mx.array(p[n]) for n in ARGNAMES[:6])
    B, N, H, D = q.shape
    K = mu.shape[1]
    cases = [
        (dict(q=q[0]), ValueError, r"'q' must have 4 dimensions"),
        (dict(k=k[:, :-1]), ValueError, r"'k' must have shape"),
        (dict(v=v[:, :, :1]), ValueError, r"'v' must have shape"),
        (dict(mu=mu[:, :, :1]), ValueError, r"'mu' must have shape"),
        (dict(alpha=alpha[:, :1]), ValueError, r"'alpha' has K=1 components but mu and omega have K="),
        (dict(q=q.astype(mx.int32), k=k.astype(mx.int32), v=v.astype(mx.int32)), TypeError, r"'q' must be a floating"),
        (dict(k=k.astype(mx.float16)), TypeError, r"'k' must have the dtype of q"),
        (dict(k=p["k"]), TypeError, r"'k' must be an mlx.core.array"),
        (dict(key_padding_mask=mx.ones((B, N))), TypeError, r"'key_padding_mask' must be a bool"),
        (dict(key_padding_mask=mx.ones((B, N + 1), dtype=mx.bool_)), ValueError, r"'key_padding_mask' must have"),
        (dict(initial_state=(mx.zeros((B, H, K, 3)), mx.zeros((B, H, K)))), ValueError, r"initial_state\[0\]"),
        (dict(initial_state=mx.zeros((B, H, K))), TypeError, r"'initial_state' must be a pair"),
        (dict(initial_state=(np.zeros((B, H, K, 4), np.float32), mx.zeros((B, H, K)))), TypeError,
         r"'initial_state\[0\] \(S\)' must be an mlx"),
        (dict(eps=-1.0), ValueError, r"'eps' must be >= 0"),
        (dict(sigma_eps=0.0), ValueError, r"'sigma_eps' must be > 0"),
        (dict(mu=mu[:, :0], omega=omega[:, :0], alpha=alpha[:, :0]), ValueError,
         r"K \(components\) must be at least 1"),
        (dict(num_threads=-2), ValueError, r"'num_threads' must be >= 0"),
    ]
    base = dict(q=q, k=k, v=v, mu=mu, omega=omega, alpha=alpha)
    for change, exc, pattern in cases:
        kwargs = {**base, **change}
        positional = [kwargs.pop(n) for n in ARGNAMES[:6]]
        with pytest.raises(exc, match=pattern):
            gma_attention(*positional, **kwargs)

    layer = GaussianMixtureAttention(8, 2, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, d_model=8\)"):
        layer(mx.zeros((2, 5, 7)))
    with pytest.raises(TypeError, match=r"x must be an mlx.core.array"):
        layer(np.zeros((2, 5, 8), np.float32))
    with pytest.raises(ValueError, match="not divisible"):
        GaussianMixtureAttention(10, 3, 4)
    with pytest.raises(ValueError, match="'device' must be None"):
        GaussianMixtureAttention(8, 2, 3, device="cpu")


def test_poisoned_outputs_are_fully_written():
    p = make_problem(seed=14)
    with testing.poisoned_outputs():
        for causal in (False, True):
            got = mlx_run(p, causal, True)
            for name, value in got.items():
                assert np.all(np.isfinite(np.asarray(value))), f"{name} has unwritten (NaN) elements"
    clean = mlx_run(p, True, True)
    for name in ("out", "S", "z", "dq", "dmu", "dS0"):
        np.testing.assert_array_equal(np.array(got[name]), np.array(clean[name]), err_msg=name)


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------

def test_layer_init_rule_and_parameter_names():
    from gmattn import _init

    layer = GaussianMixtureAttention(32, 4, 16, routing_dim=6, bias=True)
    names = {name: value.shape for name, value in _flatten(layer.parameters())}
    assert names == {
        "q_proj.weight": (24, 32), "q_proj.bias": (24,), "k_proj.weight": (24, 32), "k_proj.bias": (24,),
        "v_proj.weight": (32, 32), "v_proj.bias": (32,), "out_proj.weight": (32, 32), "out_proj.bias": (32,),
        "mu": (4, 16, 6), "omega": (4, 16, 6), "alpha": (4, 16),
    }
    sigma2 = _init.initial_variance(1 / 3, 6)
    softplus = np.logaddexp(0.0, np.array(layer.omega, dtype=np.float64))
    np.testing.assert_allclose(softplus + layer.sigma_eps, sigma2, rtol=1e-5)
    assert float(mx.abs(layer.alpha).max().item()) == 0.0
    assert abs(float(np.std(np.array(layer.mu))) - math.sqrt(1 / 3)) < 0.1
    assert float(mx.abs(layer.q_proj.weight).max().item()) <= 1 / math.sqrt(32)
    half = GaussianMixtureAttention(8, 2, 3, dtype=mx.float16)
    assert all(v.dtype == mx.float16 for _, v in _flatten(half.parameters()))


def _flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_layer_weight_parity_with_torch_layer():
    torch = pytest.importorskip("torch")
    from gmattn.torch import GaussianMixtureAttention as TorchGMA

    torch.manual_seed(0)
    t_layer = TorchGMA(24, 3, 5, routing_dim=4, causal=True, bias=True)
    from gmattn import _init
    assert t_layer.omega.detach().numpy()[0, 0, 0] == pytest.approx(_init.initial_omega(1 / 3, 4, 1e-4), rel=1e-6)
    m_layer = GaussianMixtureAttention(24, 3, 5, routing_dim=4, causal=True, bias=True)
    m_layer.load_weights([(n, mx.array(t.detach().numpy())) for n, t in t_layer.state_dict().items()], strict=True)
    np.testing.assert_allclose(np.array(m_layer.omega), t_layer.omega.detach().numpy(), rtol=1e-6)

    rng = np.random.default_rng(0)
    B, N = 2, 11
    x = rng.standard_normal((B, N, 24)).astype(np.float32)
    mask = np.ones((B, N), bool)
    mask[1, -4:] = False
    S0 = rng.standard_normal((B, 3, 5, 8)).astype(np.float32)
    z0 = rng.uniform(0.5, 1.5, (B, 3, 5)).astype(np.float32)
    gy = rng.standard_normal((B, N, 24)).astype(np.float32)

    xt = torch.tensor(x, requires_grad=True)
    yt, (St, zt) = t_layer(xt, key_padding_mask=torch.tensor(mask), state=(torch.tensor(S0), torch.tensor(z0)),
                           return_state=True)
    ((yt * torch.tensor(gy)).sum() + St.sum() + zt.sum()).backward()

    def loss(model, x):
        y, (S, z) = model(x, key_padding_mask=mx.array(mask), state=(mx.array(S0), mx.array(z0)), return_state=True)
        return (y * mx.array(gy)).sum() + S.sum() + z.sum(), (y, S, z)

    (value, (ym, Sm, zm)), grads = nn.value_and_grad(m_layer, loss)(m_layer, mx.array(x))
    assert_close(np.array(ym), yt.detach().numpy(), 1e-5, "y")
    assert_close(np.array(Sm), St.detach().numpy(), 1e-5, "S")
    assert_close(np.array(zm), zt.detach().numpy(), 1e-5, "z")
    flat = dict(_flatten(grads))
    for name, param in t_layer.named_parameters():
        assert_close(np.array(flat[name]), param.grad.numpy(), 1e-5, "grad " + name)
    dx = mx.grad(lambda x: loss(m_layer, x)[0])(mx.array(x))
    assert_close(np.array(dx), xt.grad.numpy(), 1e-5, "dx")


def test_tiny_model_trains():
    """A small causal GMA model learns a running-average target in 50 Adam steps."""
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    B, N, d = 8, 32, 16

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.attn = GaussianMixtureAttention(d, 2, 8, causal=True)
            self.head = nn.Linear(d, 1)

        def __call__(self, x):
            return self.head(x + self.attn(self.norm(x)))[..., 0]

    x = rng.standard_normal((B, N, d)).astype(np.float32)
    target = np.cumsum(x[..., 0], axis=1) / np.arange(1, N + 1)  # causal running mean of channel 0
    x, target = mx.array(x), mx.array(target.astype(np.float32))
    model = Model()
    optimizer = optim.Adam(learning_rate=1e-2)

    def loss_fn(model, x, y):
        return ((model(x) - y) ** 2).mean()

    step = nn.value_and_grad(model, loss_fn)
    losses = []
    for _ in range(50):
        loss, grads = step(model, x, target)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    # Without mixing along the sequence the model is a linear map of the current token (the
    # residual path), so it can do no better than the least-squares fit of the target from the
    # current token alone (0.091 here; real attention reaches 0.002, zeroed attention 0.092).
    tokens = np.concatenate([np.array(x).reshape(B * N, d), np.ones((B * N, 1), np.float32)], axis=1)
    y = np.array(target).reshape(B * N)
    residual = y - tokens @ np.linalg.lstsq(tokens, y, rcond=None)[0]
    no_mixing = float(np.mean(residual ** 2))
    assert losses[-1] < 0.1 * no_mixing, (f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; the best fit from the "
                                          f"current token alone is {no_mixing:.4f}: tokens did not mix")
    flat = dict(_flatten(model.parameters()))
    assert float(mx.abs(flat["attn.mu"]).sum().item()) > 0  # the mixture parameters moved
    trained = model(x)
    model.eval()  # inference mode: the op saves nothing for backward, same result
    assert model.attn.training is False
    np.testing.assert_array_equal(np.array(model(x)), np.array(trained))


def test_layer_state_convention_split_resume():
    layer = GaussianMixtureAttention(16, 2, 4, causal=True)
    x = mx.random.normal((2, 10, 16))
    y, (S, z) = layer(x, return_state=True)
    y1, state = layer(x[:, :4], return_state=True)
    y2, (S2, z2) = layer(x[:, 4:], state=state, return_state=True)
    np.testing.assert_allclose(np.array(mx.concatenate([y1, y2], axis=1)), np.array(y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(S2), np.array(S), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(z2), np.array(z), rtol=1e-5, atol=1e-6)
    assert S.shape == (2, 2, 4, 8) and z.shape == (2, 2, 4)


def test_saved_responsibilities_are_released(monkeypatch):
    """In training mode the forward keeps the responsibilities for the vjp; they are freed once the
    output is evaluated (no gradient taken) or once the gradient consumed them."""
    import gc
    import weakref

    refs = []
    real = mlx_ops._host_forward

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        if kwargs["save"]:
            refs.append(weakref.ref(result[3]))  # gq
        return result

    monkeypatch.setattr(mlx_ops, "_host_forward", spy)
    layer = GaussianMixtureAttention(16, 2, 4, causal=True)
    x = mx.random.normal((2, 12, 16))
    y = layer(x)
    assert len(refs) == 1
    mx.eval(y)
    gc.collect()
    assert refs[0]() is None
    _, grads = nn.value_and_grad(layer, lambda m, x: m(x).sum())(layer, x)
    mx.eval(grads)
    gc.collect()
    assert len(refs) == 2 and refs[1]() is None  # used by the vjp (no recomputation), then freed
    layer.eval()
    mx.eval(layer(x))
    assert len(refs) == 2  # eval mode saves nothing


def test_layer_inside_mx_compile_raises_clear_error(core_backend):
    layer = GaussianMixtureAttention(16, 2, 4)
    x = mx.random.normal((2, 12, 16))
    with pytest.raises(RuntimeError, match="outside the compiled function"):
        mx.compile(lambda x: layer(x))(x)
    assert layer(x).shape == (2, 12, 16)  # and the layer still works eagerly afterwards
