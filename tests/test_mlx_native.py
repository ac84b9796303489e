"""The MLX-native backend of gmattn.mlx.gma_attention (MLX operations with a hand-written vjp).

Every check is against the float64 naive reference (torch) or against the compiled core backend:
outputs, final states and every gradient, causal and bidirectional, with and without a key padding
mask and an initial state, in every dtype; then the MLX transformations (mx.compile of the forward
and of the gradients, mx.vmap over a leading axis, mx.jvp, streams) against eager results, and a
compiled training step of a GMA SequenceModel against the uncompiled one.

The float64 checks use 1e-10: the native backend computes exp itself in float64 (MLX's CPU exp is
only float32-accurate there), test_float64_exp_is_accurate checks that.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
optim = pytest.importorskip("mlx.optimizers")
torch = pytest.importorskip("torch")

from mlx.utils import tree_flatten  # noqa: E402

import gmattn  # noqa: E402
from gmattn import reference  # noqa: E402
from gmattn.mlx import GaussianMixtureAttention, gma_attention  # noqa: E402
from gmattn.mlx import native  # noqa: E402
from test_mlx import make_problem as make_base_problem  # noqa: E402

PARAMS = ("q", "k", "v", "mu", "omega", "alpha")
STATE = ("S0", "z0")
MX_DTYPES = {"float64": mx.float64, "float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def make_problem(B=2, N=70, H=2, D=5, Dv=4, K=6, seed=0, offset=0.0):
    """test_mlx's problem in float64 (inputs, a mask with padded rows at both ends, an initial
    state, cotangents of out, S and z), with the data and the means moved to `offset`. N = 70 is
    a full chunk and a zero-padded one."""
    p = make_base_problem(B=B, N=N, H=H, D=D, Dv=Dv, K=K, seed=seed, dtype=np.float64)
    for name in ("q", "k", "mu"):
        p[name] = p[name] + offset
    return p


def round_inputs(p, dtype):
    """The problem with q, k, v rounded to `dtype` (so the reference sees what the op sees)."""
    r = dict(p)
    for n in ("q", "k", "v"):
        r[n] = np.array(mx.array(p[n], dtype=mx.float64).astype(MX_DTYPES[dtype]).astype(mx.float64))
    return r


def reference_run(p, causal, masked, with_state):
    """Outputs, final state and gradients of the loss <out, g_out> + <S, g_S> + <z, g_z>: float64 naive."""
    names = PARAMS + (STATE if with_state else ())
    t = {n: torch.tensor(p[n], dtype=torch.float64, requires_grad=True) for n in names}
    out, (S, z) = reference.naive_gma(
        *(t[n] for n in PARAMS), causal=causal, key_padding_mask=torch.tensor(p["mask"]) if masked else None,
        initial_state=(t["S0"], t["z0"]) if with_state else None, output_final_state=True)
    loss = sum((a * torch.tensor(p[g])).sum() for a, g in ((out, "g_out"), (S, "g_S"), (z, "g_z")))
    loss.backward()
    res = {"out": out, "S": S, "z": z}
    res.update({"d" + n: t[n].grad for n in names})
    return {n: a.detach().numpy() for n, a in res.items()}


@pytest.fixture(autouse=True)
def native_by_default(monkeypatch):
    """These tests are about the native backend: calls without backend= run it (the default
    "auto" would take the core for eager CPU calls, the native backend under mx.compile / mx.vmap).
    Tests of the switching itself set the environment themselves."""
    monkeypatch.setenv(gmattn.mlx.ops.BACKEND_ENV, "native")


def mlx_loss(p, causal, masked, with_state, dtype, backend="native"):
    """(loss(*arrays) -> (loss, (out, S, z)), arrays): MLX arrays of the problem (q, k, v in `dtype`,
    the rest float32, float64 for float64) and the loss of reference_run."""
    acc = mx.float64 if dtype == "float64" else mx.float32
    names = PARAMS + (STATE if with_state else ())
    arrays = [mx.array(p[n], dtype=acc).astype(MX_DTYPES[dtype]) if n in "qkv" else mx.array(p[n], dtype=acc)
              for n in names]
    mask = mx.array(p["mask"]) if masked else None
    cot = {n: mx.array(p[n], dtype=acc) for n in ("g_out", "g_S", "g_z")}

    def loss(*a):
        out, (S, z) = gma_attention(*a[:6], causal=causal, key_padding_mask=mask,
                                    initial_state=(a[6], a[7]) if with_state else None, output_final_state=True,
                                    backend=backend)
        value = (out.astype(acc) * cot["g_out"]).sum() + (S * cot["g_S"]).sum() + (z * cot["g_z"]).sum()
        return value, (out, S, z)

    return loss, arrays


def as_results(names, aux, grads):
    out, S, z = aux
    res = {"out": out, "S": S, "z": z}
    res.update({"d" + n: g for n, g in zip(names, grads)})
    return {n: np.array(a.astype(mx.float64) if a.dtype != mx.float64 else a) for n, a in res.items()}


def mlx_run(p, causal, masked, with_state, dtype, backend="native", transform=None):
    """Outputs, state and every gradient through mx.value_and_grad (optionally transformed)."""
    loss, arrays = mlx_loss(p, causal, masked, with_state, dtype, backend)
    fn = mx.value_and_grad(loss, argnums=list(range(len(arrays))))
    if transform is not None:
        fn = transform(fn)
    (_, aux), grads = fn(*arrays)
    mx.eval(aux, grads)
    return as_results(PARAMS + (STATE if with_state else ()), aux, grads)


def assert_matches(got, want, tol, context=""):
    """Every entry of `want` within tol of `got`, relative to the entry's largest magnitude."""
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, f"{context} {name}: shape {g.shape} != {w.shape}"
        assert np.all(np.isfinite(g)), f"{context} {name}: non-finite values"
        err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)
        assert err <= tol, f"{context} {name}: relative error {err:.2e} > {tol:.0e}"


CASES = [(c, m, s) for c in (False, True) for m, s in ((False, False), (True, True), (True, False))]
CASE_IDS = [f"{'causal' if c else 'bidirectional'}{'-mask' if m else ''}{'-state' if s else ''}" for c, m, s in CASES]


# ----------------------------------------------------------------------------------------------
# against the float64 reference and the core backend
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,masked,with_state", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-5)])
def test_native_against_float64_reference(causal, masked, with_state, dtype, tol):
    p = make_problem(seed=1)
    got = mlx_run(p, causal, masked, with_state, dtype)
    assert_matches(got, reference_run(p, causal, masked, with_state), tol, f"{dtype}")


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_many_chunks_and_off_centre_data(causal):
    """18 chunks (two levels of the blocked sums over chunks, a padded tail) and data and means
    far from the origin, where the centred quadratic form matters."""
    p = make_problem(B=1, N=native.CHUNK * 17 + 5, H=1, D=3, Dv=2, K=3, seed=2, offset=20.0)
    assert -(-p["q"].shape[1] // native.CHUNK) > native.SCAN_GROUP
    want = reference_run(p, causal, True, True)
    assert_matches(mlx_run(p, causal, True, True, "float64"), want, 1e-10, "float64")
    assert_matches(mlx_run(p, causal, True, True, "float32"), want, 1e-4, "float32")


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_far_away_padding_does_not_cost_accuracy(causal):
    """Masked rows holding values far from the data (padding tokens) are left out of the chunk
    centres, so the real rows keep float32 accuracy: their outputs and all gradients (the loss
    reads the real rows' outputs only)."""
    p = make_problem(seed=18)
    for name in ("q", "k"):
        p[name][~p["mask"]] = 1000.0
    p["g_out"][~p["mask"]] = 0.0
    want = reference_run(p, causal, True, False)
    got = mlx_run(p, causal, True, False, "float32")
    real = p["mask"]
    want["out"], got["out"] = want["out"][real], got["out"][real]
    assert_matches(got, want, 2e-5, "float32")


@pytest.mark.parametrize("dtype,tol", [("float16", 3e-3), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_low_precision(dtype, tol, causal):
    """float16 / bfloat16 q, k, v: out and the gradients of q, k, v in that dtype, the state and the
    parameter gradients float32; against the reference on the same rounded inputs, and against the
    core backend."""
    p = round_inputs(make_problem(seed=3), dtype)
    got = mlx_run(p, causal, True, True, dtype)
    loss, arrays = mlx_loss(p, causal, True, True, dtype)
    _, (out, S, z) = loss(*arrays)
    assert out.dtype == MX_DTYPES[dtype] and S.dtype == mx.float32 and z.dtype == mx.float32
    assert_matches(got, reference_run(p, causal, True, True), tol, dtype)
    assert_matches(got, mlx_run(p, causal, True, True, dtype, backend="core"), tol, f"{dtype} vs core")


@pytest.mark.parametrize("causal,masked,with_state", CASES, ids=CASE_IDS)
def test_native_equals_core_backend(causal, masked, with_state):
    p = make_problem(seed=4)
    native_res = mlx_run(p, causal, masked, with_state, "float32")
    core_res = mlx_run(p, causal, masked, with_state, "float32", backend="core")
    assert_matches(native_res, core_res, 2e-5, "native vs core")


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_long_float32_sequence_accuracy(causal):
    """65536 rows (1024 chunks) in float32, same-signed values (the hard case for a running sum):
    outputs and final state within twice the core backend's error (which sums with compensation)
    against the float64 reference, or within 2 ulp. The blocked sums over chunks are what keeps
    this: one running sum over the chunks is about ten times worse on the state here."""
    p = make_problem(B=1, N=65536, H=1, D=4, Dv=4, K=4, seed=5)
    p["v"] = p["v"] + 1.0
    want_out, (want_S, want_z) = reference.chunked_gma(*(torch.tensor(p[n]) for n in PARAMS), causal=causal,
                                                       output_final_state=True)
    want = {"out": want_out.numpy(), "S": want_S.numpy(), "z": want_z.numpy()}
    errors = {}
    for backend in ("native", "core"):
        out, (S, z) = gma_attention(*(mx.array(p[n], dtype=mx.float32) for n in PARAMS), causal=causal,
                                    output_final_state=True, backend=backend)
        for name, got in (("out", out), ("S", S), ("z", z)):
            w = want[name]
            errors[backend, name] = np.max(np.abs(np.array(got, dtype=np.float64) - w)) / np.max(np.abs(w))
    for name in want:
        bound = 2 * max(errors["core", name], 2.0 ** -24)
        assert errors["native", name] <= bound, f"{name}: native {errors['native', name]:.2e}, core " \
                                                f"{errors['core', name]:.2e}"


def test_float64_exp_is_accurate():
    """exp, softmax, log_softmax, softplus and sigmoid of the native backend in float64, against
    NumPy, over the whole range the op meets (MLX's own float64 exp is off by about 1e-8)."""
    x = np.concatenate([np.linspace(-700.0, 700.0, 20001), [-1e-12, 0.0, 1e-12, 0.5, -0.5]])
    xm = mx.array(x, dtype=mx.float64)
    np.testing.assert_allclose(np.array(native._exp(xm)), np.exp(x), rtol=1e-15, atol=0)
    np.testing.assert_allclose(np.array(native._softplus(xm)), np.logaddexp(x, 0.0), rtol=1e-15, atol=1e-300)
    e = np.exp(-np.abs(x))
    np.testing.assert_allclose(np.array(native._sigmoid(xm)), np.where(x >= 0, 1.0, e) / (1.0 + e), rtol=1e-15,
                               atol=1e-300)
    rows = np.random.default_rng(0).standard_normal((50, 7)) * 30
    rm = mx.array(rows, dtype=mx.float64)
    logp = rows - rows.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.array(native._log_softmax(rm)), logp, rtol=1e-14, atol=1e-13)
    np.testing.assert_allclose(np.array(native._softmax(rm)), np.exp(logp), rtol=1e-13, atol=1e-300)
    assert native._exp(mx.array([-800.0], dtype=mx.float64)).item() < 1e-307  # below the range: ~0


def test_backend_switches(monkeypatch):
    p = make_problem(seed=6)
    args = [mx.array(p[n], dtype=mx.float32) for n in PARAMS]
    calls = []
    real = native.gma_attention_native

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(gmattn.mlx.ops, "gma_attention_native", spy)
    monkeypatch.delenv(gmattn.mlx.ops.BACKEND_ENV, raising=False)
    assert gmattn.mlx.get_backend() == "auto"
    gma_attention(*args)                    # auto, eager on the CPU: the core
    assert len(calls) == 0
    mx.eval(mx.compile(lambda *a: gma_attention(*a))(*args))   # auto, traced: native
    assert len(calls) == 1
    mx.eval(mx.vmap(lambda q: gma_attention(q, *args[1:]))(args[0][None]))
    assert len(calls) == 2
    gma_attention(*args, backend="native")
    assert len(calls) == 3
    calls.clear()
    gma_attention(*args, backend="native")
    assert len(calls) == 1
    gma_attention(*args, backend="core")
    assert len(calls) == 1
    monkeypatch.setenv(gmattn.mlx.ops.BACKEND_ENV, "core")
    assert gmattn.mlx.get_backend() == "core"
    gma_attention(*args)
    assert len(calls) == 1
    gma_attention(*args, backend="native")  # the argument wins over the environment
    assert len(calls) == 2
    try:
        gmattn.mlx.set_backend("native")  # set_backend wins over the environment
        gma_attention(*args)
        assert len(calls) == 3
        gmattn.mlx.set_backend("core")
        gma_attention(*args)
        assert len(calls) == 3
    finally:
        gmattn.mlx.set_backend(None)
    assert gmattn.mlx.get_backend() == "core"
    # and through the framework-neutral entry point
    gmattn.gma_attention(*args)
    assert len(calls) == 3


def test_bad_backend_names_are_refused(monkeypatch):
    p = make_problem(seed=6)
    args = [mx.array(p[n], dtype=mx.float32) for n in PARAMS]
    with pytest.raises(ValueError, match="'backend' must be one of 'auto', 'native', 'core', got 'metal'"):
        gma_attention(*args, backend="metal")
    with pytest.raises(ValueError, match="set_backend's 'name'"):
        gmattn.mlx.set_backend("gpu")
    monkeypatch.setenv(gmattn.mlx.ops.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="GMATTN_MLX_BACKEND must be one of"):
        gma_attention(*args)


# ----------------------------------------------------------------------------------------------
# MLX transformations
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,masked,with_state", CASES[:2] + CASES[3:5], ids=CASE_IDS[:2] + CASE_IDS[3:5])
def test_compiled_forward_and_gradients_equal_eager(causal, masked, with_state):
    p = make_problem(seed=7)
    eager = mlx_run(p, causal, masked, with_state, "float32")
    loss, arrays = mlx_loss(p, causal, masked, with_state, "float32")
    forward = mx.compile(lambda *a: loss(*a)[1])
    compiled_out = forward(*arrays)
    assert_matches({n: np.array(a) for n, a in zip(("out", "S", "z"), compiled_out)},
                   {n: eager[n] for n in ("out", "S", "z")}, 1e-6, "compiled forward")
    compiled = mlx_run(p, causal, masked, with_state, "float32", transform=mx.compile)
    assert_matches(compiled, eager, 1e-6, "compiled value_and_grad")


def test_compiled_function_is_reused_across_calls():
    """One trace, then calls with new data of the same shapes (no retracing, no stale constants)."""
    traces = []

    def f(q, k, v, mu, omega, alpha):
        traces.append(1)
        return mx.grad(lambda q: gma_attention(q, k, v, mu, omega, alpha, causal=True).sum())(q)

    compiled = mx.compile(f)
    for seed in (8, 9):
        p = make_problem(seed=seed)
        args = [mx.array(p[n], dtype=mx.float32) for n in PARAMS]
        np.testing.assert_allclose(np.array(compiled(*args)), np.array(f(*args)), rtol=1e-5, atol=1e-6)
    assert len(traces) == 3  # one trace + the two eager calls


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_vmap_over_a_leading_axis_equals_a_loop(causal):
    """mx.vmap over a leading axis of q, k, v, the mask and the state (parameters shared), forward
    and gradients, equals running each slice on its own."""
    problems = [make_problem(B=2, N=20, seed=10 + i) for i in range(3)]
    stack = {n: mx.array(np.stack([p[n] for p in problems]), dtype=mx.float32)
             for n in ("q", "k", "v", "S0", "z0", "g_out")}
    mask = mx.array(np.stack([p["mask"] for p in problems]))
    mu, omega, alpha = (mx.array(problems[0][n], dtype=mx.float32) for n in ("mu", "omega", "alpha"))

    def run(q, k, v, m, S0, z0, mu, omega, alpha):
        out, (S, z) = gma_attention(q, k, v, mu, omega, alpha, causal=causal, key_padding_mask=m,
                                    initial_state=(S0, z0), output_final_state=True)
        return out, S, z

    def loss(q, k, v, m, S0, z0, g, mu, omega, alpha):
        out, S, z = run(q, k, v, m, S0, z0, mu, omega, alpha)
        return (out * g).sum() + S.sum() + (z * z).sum()

    grad = mx.grad(loss, argnums=[0, 1, 2, 4, 5, 7, 8, 9])
    args = [stack[n] for n in ("q", "k", "v")] + [mask, stack["S0"], stack["z0"]]
    shared = (None,) * 3
    mapped_out = mx.vmap(run, in_axes=(0,) * 6 + shared)(*args, mu, omega, alpha)
    mapped_grads = mx.vmap(grad, in_axes=(0,) * 7 + shared)(*args, stack["g_out"], mu, omega, alpha)
    for i in range(len(problems)):
        one = [a[i] for a in args]
        want_out = run(*one, mu, omega, alpha)
        want_grads = grad(*one, stack["g_out"][i], mu, omega, alpha)
        for got, want in zip(mapped_out, want_out):
            np.testing.assert_allclose(np.array(got[i]), np.array(want), rtol=1e-5, atol=1e-6)
        for got, want in zip(mapped_grads, want_grads):  # per-slice parameter gradients too
            np.testing.assert_allclose(np.array(got[i]), np.array(want), rtol=1e-5, atol=1e-6)
    # and compiled
    compiled = mx.compile(mx.vmap(grad, in_axes=(0,) * 7 + shared))(*args, stack["g_out"], mu, omega, alpha)
    for got, want in zip(compiled, mapped_grads):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_forward_mode_agrees_with_the_vjp(causal):
    """mx.jvp (MLX's own forward-mode derivative of the native forward) and the hand-written vjp
    satisfy <J t, g> = <t, J^T g> for random tangents t and cotangents g (float64)."""
    p = make_problem(seed=11)
    loss, arrays = mlx_loss(p, causal, True, True, "float64")
    rng = np.random.default_rng(12)
    tangents = [mx.array(rng.standard_normal(a.shape)) for a in arrays]

    def outputs(*a):
        return loss(*a)[1]

    _, jvp_out = mx.jvp(outputs, arrays, tangents)
    cots = [mx.array(p[n]) for n in ("g_out", "g_S", "g_z")]
    _, vjp_in = mx.vjp(outputs, arrays, cots)
    lhs = sum(float((j * c).sum().item()) for j, c in zip(jvp_out, cots))
    rhs = sum(float((t * g).sum().item()) for t, g in zip(tangents, vjp_in))
    assert abs(lhs - rhs) <= 1e-6 * max(abs(lhs), 1.0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_second_order_gradients_match_finite_differences(causal):
    """The gradient of <grad L, t> (MLX differentiating the vjp's operations) along a random
    direction d equals the central finite difference of <grad L, t> along d (float64). The vjp reads
    the forward's responsibilities, so this needs the vjp's handling of their cotangents."""
    p = make_problem(seed=16)
    loss, arrays = mlx_loss(p, causal, True, True, "float64")
    rng = np.random.default_rng(17)
    t = [mx.array(rng.standard_normal(a.shape)) for a in arrays]
    d = [mx.array(rng.standard_normal(a.shape)) for a in arrays]
    argnums = list(range(len(arrays)))

    def grad_along_t(*a):
        grads = mx.grad(lambda *b: loss(*b)[0], argnums=argnums)(*a)
        return sum((g * ti).sum() for g, ti in zip(grads, t))

    second = mx.grad(grad_along_t, argnums=argnums)(*arrays)
    exact = sum(float((s * di).sum().item()) for s, di in zip(second, d))
    h = 1e-5
    plus = grad_along_t(*(a + h * di for a, di in zip(arrays, d))).item()
    minus = grad_along_t(*(a - h * di for a, di in zip(arrays, d))).item()
    assert abs(exact - (plus - minus) / (2 * h)) <= 1e-6 * abs(exact)


def test_runs_on_another_stream_and_stays_lazy():
    """The op builds a lazy graph (nothing is evaluated until asked: it traces under mx.compile,
    where evaluation is impossible), on the stream it is called on."""
    p = make_problem(seed=13)
    args = [mx.array(p[n], dtype=mx.float32) for n in PARAMS]
    want = gma_attention(*args, causal=True)
    stream = mx.new_stream(mx.cpu)
    with mx.stream(stream):
        got = gma_attention(*args, causal=True)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    shapes = mx.compile(lambda *a: gma_attention(*a, causal=True))(*args)
    np.testing.assert_allclose(np.array(shapes), np.array(want), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# layers and models under a compiled training step
# ----------------------------------------------------------------------------------------------

def _train(model, tokens, targets, steps, compiled):
    optimizer = optim.Adam(learning_rate=1e-2)

    def loss_fn(model, tokens, targets):
        logits = model(tokens)
        return nn.losses.cross_entropy(logits, targets).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(tokens, targets):
        loss, grads = loss_and_grad(model, tokens, targets)
        optimizer.update(model, grads)
        return loss

    if compiled:
        state = [model.state, optimizer.state]
        step = mx.compile(step, inputs=state, outputs=state)
    losses = []
    for _ in range(steps):
        loss = step(tokens, targets)
        mx.eval(loss, model.parameters(), optimizer.state)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("causal", [False, True], ids=["classifier-bidirectional", "lm-causal"])
def test_compiled_training_step_equals_uncompiled(causal):
    """A GMA SequenceModel trained for a few Adam steps under mx.compile(step) (with
    nn.value_and_grad) follows the uncompiled run: same losses, same parameters."""
    rng = np.random.default_rng(14)
    tokens = mx.array(rng.integers(0, 50, (2, 24)))
    if causal:
        targets = mx.array(rng.integers(0, 50, (2, 24)))
        head = {"head": "lm"}
    else:
        targets = mx.array(rng.integers(0, 3, (2,)))
        head = {"head": "classification", "num_classes": 3}
    models = []
    for _ in range(2):
        mx.random.seed(15)
        models.append(gmattn.build_model("gma", framework="mlx", vocab_size=50, num_layers=2, d_model=32,
                                         num_heads=2, num_components=4, causal=causal, **head))
    eager = _train(models[0], tokens, targets, 4, compiled=False)
    compiled = _train(models[1], tokens, targets, 4, compiled=True)
    np.testing.assert_allclose(compiled, eager, rtol=1e-5)
    assert eager[-1] < eager[0]  # it trains
    params = dict(tree_flatten(models[1].parameters()))
    for name, value in tree_flatten(models[0].parameters()):
        np.testing.assert_allclose(np.array(params[name]), np.array(value), rtol=1e-4, atol=1e-5, err_msg=name)


def test_layer_compiles_and_matches_core_backend():
    layer = GaussianMixtureAttention(16, 2, 4, causal=True)
    x = mx.random.normal((2, 30, 16))
    mask = mx.array(np.arange(30)[None, :] < np.array([[30], [21]]))
    y_compiled = mx.compile(lambda x: layer(x, key_padding_mask=mask))(x)
    try:
        gmattn.mlx.set_backend("core")
        y_core = layer(x, key_padding_mask=mask)
    finally:
        gmattn.mlx.set_backend(None)
    np.testing.assert_allclose(np.array(y_compiled), np.array(y_core), rtol=1e-5, atol=1e-6)


def test_paths_benchmark_runs(tmp_path):
    """benchmarks/mlx_paths.py at a tiny size: both backends, compiled and not, and its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mlx_paths.py"
    out = tmp_path / "paths.json"
    run = subprocess.run([sys.executable, str(script), "--N", "80", "--H", "1", "--D", "4", "--Dv", "4", "--K", "3",
                          "--repeats", "1", "--warmup", "0", "--matmul", "64", "--causal", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ratio" in run.stdout
    result = json.loads(out.read_text())
    assert {"forward native", "forward core", "fwd+bwd native compiled"} <= set(result["median_ms"])
    assert all(t > 0 for t in result["median_ms"].values())
