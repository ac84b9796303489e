"""The compiled CPU core through the torch front end, judged against the float64 reference
(docs/design.md section 5): outputs, final state and every gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import gmattn
from gmattn import reference
from gmattn.testing import poisoned_outputs
from gmattn.torch.ops import backward_op, forward_op

from conftest import LOW_PRECISION_STATE_FLOOR, make_problem, plain_mixed_precision

TOL64 = dict(rtol=1e-9, atol=1e-11)


def run(fn, p, causal, *, final_state=True, seed=123):
    """Calls fn like gma_attention; returns (outputs, gradients of a random linear loss)."""
    kwargs = dict(causal=causal, key_padding_mask=p.mask, initial_state=p.state, output_final_state=final_state)
    res = fn(p.q, p.k, p.v, p.mu, p.omega, p.alpha, **kwargs)
    outs = [res[0], res[1][0], res[1][1]] if final_state else [res]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    grads = torch.autograd.grad(loss, p.tensors())
    return [o.detach() for o in outs], [x.detach() for x in grads]


def assert_close_all(got, want, names, **tol):
    for a, b, name in zip(got, want, names):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        torch.testing.assert_close(a.double(), b.double(), msg=lambda m: f"{name}: {m}", **tol)


GRAD_NAMES = ["dq", "dk", "dv", "dmu", "domega", "dalpha", "dS0", "dz0"]
OUT_NAMES = ["out", "S_final", "z_final"]

SHAPES = [
    # B, N, H, K, D, Dv
    (2, 37, 3, 5, 4, 6),     # D != Dv, N below one chunk
    (1, 1, 1, 1, 2, 3),      # N = 1, K = 1, B*H = 1
    (1, 130, 1, 7, 5, 3),    # N not a multiple of the chunk, B*H = 1
    (3, 65, 4, 1, 3, 2),     # K = 1, chunk + 1
    (4, 20, 5, 3, 2, 2),     # B*H = 20, much larger than the thread count
    (1, 200, 2, 16, 8, 8),   # several chunks
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}H{}K{}D{}Dv{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("mask,state", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "mask", "state", "mask+state"])
def test_matches_naive_float64(shape, causal, mask, state):
    B, N, H, K, D, Dv = shape
    p = make_problem(B, N, H, K, D, Dv, mask=mask, state=state, seed=sum(shape))
    with poisoned_outputs():
        outs, grads = run(gmattn.gma_attention, p, causal)
    ref_outs, ref_grads = run(reference.naive_gma, p.detached(), causal)
    assert_close_all(outs, ref_outs, OUT_NAMES, **TOL64)
    assert_close_all(grads, ref_grads, GRAD_NAMES, **TOL64)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_without_final_state(causal):
    p = make_problem(2, 70, 2, 4, 3, 5, mask=True)
    outs, grads = run(gmattn.gma_attention, p, causal, final_state=False)
    ref_outs, ref_grads = run(reference.naive_gma, p.detached(), causal, final_state=False)
    assert_close_all(outs, ref_outs, OUT_NAMES, **TOL64)
    assert_close_all(grads, ref_grads, GRAD_NAMES, **TOL64)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradcheck(causal):
    p = make_problem(2, 9, 2, 3, 3, 2, mask=True, state=True, seed=7)

    def fn(q, k, v, mu, omega, alpha, S0, z0):
        out, (S, z) = gmattn.gma_attention(q, k, v, mu, omega, alpha, causal=causal, key_padding_mask=p.mask,
                                           initial_state=(S0, z0), output_final_state=True)
        return out, S, z

    assert torch.autograd.gradcheck(fn, tuple(p.tensors()), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_without_mask_or_state():
    p = make_problem(1, 70, 1, 2, 2, 2, seed=3)
    for causal in (False, True):
        fn = lambda *t: gmattn.gma_attention(*t, causal=causal)  # noqa: E731
        assert torch.autograd.gradcheck(fn, tuple(p.tensors()), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("split", [1, 40, 64, 99])
def test_split_resume(split):
    """Two causal calls with the state handed across equal one call: outputs, state, gradients."""
    p = make_problem(2, 100, 2, 6, 4, 5, mask=True, state=True, seed=11)
    outs, grads = run(gmattn.gma_attention, p, True)

    def two_halves(q, k, v, mu, omega, alpha, *, causal, key_padding_mask, initial_state, output_final_state):
        m = key_padding_mask
        out1, st = gmattn.gma_attention(q[:, :split], k[:, :split], v[:, :split], mu, omega, alpha, causal=True,
                                        key_padding_mask=m[:, :split], initial_state=initial_state,
                                        output_final_state=True)
        out2, st = gmattn.gma_attention(q[:, split:], k[:, split:], v[:, split:], mu, omega, alpha, causal=True,
                                        key_padding_mask=m[:, split:], initial_state=st, output_final_state=True)
        return torch.cat([out1, out2], dim=1), st

    p2 = p.detached()
    outs2, grads2 = run(two_halves, p2, True)
    assert_close_all(outs2, outs, OUT_NAMES, **TOL64)
    assert_close_all(grads2, grads, GRAD_NAMES, **TOL64)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_mask_equals_loop_over_trimmed_sequences(causal):
    """A right-padded batch with a mask equals running each sequence alone at its true length."""
    lengths = [13, 70, 1, 64]
    B, N, H, K, D, Dv = len(lengths), max(lengths), 2, 5, 3, 4
    p = make_problem(B, N, H, K, D, Dv, seed=5)
    mask = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    out, (S, z) = gmattn.gma_attention(p.q, p.k, p.v, p.mu, p.omega, p.alpha, causal=causal,
                                       key_padding_mask=mask, output_final_state=True)
    for b, n in enumerate(lengths):
        o_b, (S_b, z_b) = gmattn.gma_attention(p.q[b:b + 1, :n], p.k[b:b + 1, :n], p.v[b:b + 1, :n], p.mu,
                                               p.omega, p.alpha, causal=causal, output_final_state=True)
        torch.testing.assert_close(out[b:b + 1, :n], o_b, **TOL64)
        torch.testing.assert_close(S[b:b + 1], S_b, **TOL64)
        torch.testing.assert_close(z[b:b + 1], z_b, **TOL64)
        assert torch.isfinite(out[b]).all(), "outputs at padded positions must be defined"


def test_non_contiguous_inputs():
    p = make_problem(2, 50, 3, 4, 5, 6, mask=True, state=True, seed=9)
    outs, grads = run(gmattn.gma_attention, p, True)
    # Same values, other memory layouts: transposed storage, strided views, Fortran-ish params.
    q = p.q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    k_big = torch.zeros(2, 50, 3, 10, dtype=torch.float64)
    k_big[..., ::2] = p.k.detach()
    k = k_big[..., ::2].requires_grad_()
    v = p.v.detach().permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0).requires_grad_()
    mu = p.mu.detach().transpose(0, 2).contiguous().transpose(0, 2).requires_grad_()
    mask_big = torch.zeros(2, 100, dtype=torch.bool)
    mask_big[:, ::2] = p.mask
    S0 = p.state[0].detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or mu.is_contiguous())
    from conftest import Problem

    p2 = Problem(q, k, v, mu, p.omega.detach().clone().requires_grad_(), p.alpha.detach().clone().requires_grad_(),
                 mask_big[:, ::2], (S0, p.state[1].detach().clone().requires_grad_()))
    outs2, grads2 = run(gmattn.gma_attention, p2, True)
    assert_close_all(outs2, outs, OUT_NAMES, rtol=0, atol=0)
    assert_close_all(grads2, grads, GRAD_NAMES, rtol=0, atol=0)


def test_expanded_zero_stride_gradient():
    """Backward receives dout with zero strides (gradient of .sum()); the kernel must read it right."""
    p = make_problem(1, 40, 2, 3, 4, 4, seed=2)
    out = gmattn.gma_attention(p.q, p.k, p.v, p.mu, p.omega, p.alpha, causal=True)
    grads = torch.autograd.grad(out.sum(), p.tensors())
    p2 = p.detached()
    ref = reference.naive_gma(p2.q, p2.k, p2.v, p2.mu, p2.omega, p2.alpha, causal=True)
    ref_grads = torch.autograd.grad(ref.sum(), p2.tensors())
    assert_close_all(grads, ref_grads, GRAD_NAMES, **TOL64)


def test_float32_close_to_float64():
    p64 = make_problem(2, 300, 4, 16, 16, 16, mask=True, state=True, seed=21)
    p32 = p64.detached(torch.float32)
    for causal in (False, True):
        outs, grads = run(gmattn.gma_attention, p32, causal)
        ref_outs, ref_grads = run(reference.naive_gma, p64.detached(), causal)
        for a, b, name in zip(outs + grads, ref_outs + ref_grads, OUT_NAMES + GRAD_NAMES):
            err = (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
            assert err < 2e-5, f"{name} (causal={causal}): relative error {err:.2e} in float32"


def mixed_precision(p, dtype):
    """p's q, k, v in `dtype` (16-bit); parameters and state in float32, as a mixed-precision
    model holds them."""
    low = p.detached(dtype)
    for name in ("mu", "omega", "alpha"):
        setattr(low, name, getattr(p, name).detach().float().requires_grad_())
    if p.state is not None:
        low.state = tuple(s.detach().float().requires_grad_() for s in p.state)
    return low


# Low-precision budgets: 2x (outputs) / 3x (gradients) the error of plain PyTorch given the same
# inputs (16-bit q, k, v; float32 parameters and state: it computes in float32 and rounds its
# outputs), both measured against float64 on the same values. Measured on the problem below
# (bf16 and f16, both directions): out, dq, dk, dv and dS0 match plain PyTorch's error (ratio
# 0.96-1.00: both are the rounding of a float32 result to 16 bits); dmu, domega, dalpha, dz0
# 0.7-2.35x (they sum terms that carry the 16-bit dout). The final state is float32 in both, its
# error a few float32 roundoffs (2e-7 of its scale, ratio 0.45-1.7): there the floor
# LOW_PRECISION_STATE_FLOOR (conftest) decides.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_low_precision_within_pytorch_error(dtype, causal):
    """Every output and gradient against float64, within 2x (3x for gradients) of plain PyTorch's
    error with the same 16-bit inputs and float32 parameters (LOW_PRECISION_STATE_FLOOR above)."""
    p = make_problem(2, 150, 2, 8, 8, 8, mask=True, state=True, seed=4)
    ref_outs, ref_grads = run(reference.naive_gma, mixed_precision(p, dtype).detached(torch.float64), causal)
    torch_outs, torch_grads = run(plain_mixed_precision(reference.naive_gma), mixed_precision(p, dtype), causal)
    outs, grads = run(gmattn.gma_attention, mixed_precision(p, dtype), causal)
    low = ("out", "dq", "dk", "dv")  # in the inputs' dtype; the rest float32
    for a, t, r, name, factor in zip(outs + grads, torch_outs + torch_grads, ref_outs + ref_grads,
                                     OUT_NAMES + GRAD_NAMES, [2] * 3 + [3] * 8):
        expected = dtype if name in low else torch.float32
        assert a.dtype == expected and t.dtype == expected, f"{name}: dtype {a.dtype}, expected {expected}"
        ours = (a.double() - r).abs().max().item()
        theirs = (t.double() - r).abs().max().item()
        floor = LOW_PRECISION_STATE_FLOOR * r.abs().max().item() if name in ("S_final", "z_final") else 0.0
        assert ours <= factor * theirs + floor, f"{name}: error {ours:.3e} vs plain PyTorch {theirs:.3e}"


def test_output_dtypes_follow_inputs():
    p = make_problem(1, 10, 2, 3, 4, 5, state=True, dtype=torch.float32)
    q16 = p.q.detach().bfloat16()
    out, (S, z) = gmattn.gma_attention(q16, p.k.detach().bfloat16(), p.v.detach().bfloat16(), p.mu, p.omega,
                                       p.alpha, causal=True, initial_state=p.state, output_final_state=True)
    assert out.dtype == torch.bfloat16 and S.dtype == torch.float32 and z.dtype == torch.float32
    grads = torch.autograd.grad(out.float().sum(), [p.mu, p.omega, p.alpha])
    assert all(g.dtype == torch.float32 for g in grads)


def test_parameter_gradients_deterministic():
    p = make_problem(8, 300, 2, 16, 8, 8, mask=True, dtype=torch.float32, seed=13)
    first = run(gmattn.gma_attention, p, True)[1]
    for _ in range(3):
        again = run(gmattn.gma_attention, p, True)[1]
        for a, b, name in zip(again, first, GRAD_NAMES):
            assert torch.equal(a, b), f"{name} differs between identical runs"


# (B, H) and the plan the CPU core makes for it at 2 threads (cpp/cpu/plan.h, make_plan): fewer
# pairs than four per thread and not a multiple of the thread count -> each sequence is cut into
# segments (causal: the scans run as relays between the threads; bidirectional: two passes);
# a multiple of the thread count -> whole sequences per task.
THREAD_PLANS = [((1, 1), "segments"), ((1, 3), "segments"), ((2, 3), "whole sequences")]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("BH,plan", THREAD_PLANS, ids=[f"BH{b * h}-{plan}" for (b, h), plan in THREAD_PLANS])
def test_thread_counts_agree(BH, plan, causal):
    """1 and 2 threads give the float64 reference's outputs, state and gradients (11 chunks, a
    mask and an initial state), whichever plan the thread count makes."""
    B, H = BH
    # K = D = Dv = 16: enough work per call that the core uses the threads it is given (a call with
    # very little work runs on one thread; plan.h threads_for).
    p = make_problem(B, 700, H, 16, 16, 16, mask=True, state=True, dtype=torch.float64, seed=17)
    ref = run(reference.naive_gma, p.detached(), causal)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = run(gmattn.gma_attention, p.detached(), causal)
            assert_close_all(got[0] + got[1], ref[0] + ref[1], OUT_NAMES + GRAD_NAMES, **TOL64)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task")
def test_one_pair_causal_runs_as_a_relay_on_two_threads():
    """The relay path is taken: a causal call with one (batch, head) pair runs on two OpenMP threads
    when given two (every other causal plan hands a whole sequence to one thread, and the plan
    then uses one thread for one task). Counted as the threads the process has: OpenMP keeps its
    pool, so the second thread appears with the first call that used it. A fresh process without
    torch (whose own pool would blur the count): the NumPy front end."""
    script = textwrap.dedent(
        """
        import os, numpy as np
        from gmattn.numpy_ops import gma_attention
        threads = lambda: len(os.listdir("/proc/self/task"))
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 700, 1, 16), dtype=np.float32) for _ in range(3))
        mu, omega = rng.standard_normal((1, 16, 16)), rng.standard_normal((1, 16, 16))
        alpha = rng.standard_normal((1, 16))
        args = [q, k, v, *(a.astype(np.float32) for a in (mu, omega, alpha))]
        counts = [threads()]
        for n in (1, 1, 2, 2):
            out = gma_attention(*args, causal=True, num_threads=n)
            counts.append(threads())
        print(*counts)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    start, one, one_again, two, two_again = map(int, res.stdout.split())
    assert start == one == one_again, f"one thread asked, threads {start} -> {one} -> {one_again}"
    assert two == two_again == one + 1, f"two threads asked for one pair: threads {one} -> {two} -> {two_again}"


def test_numpy_forward_matches_torch():
    p = make_problem(2, 90, 2, 5, 4, 3, mask=True, state=True, dtype=torch.float32, seed=8)
    args = [t.detach() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)]
    st = tuple(s.detach() for s in p.state)
    for causal in (False, True):
        want, (S_w, z_w) = gmattn.gma_attention(*args, causal=causal, key_padding_mask=p.mask, initial_state=st,
                                                output_final_state=True)
        with poisoned_outputs():
            got, (S_g, z_g) = gmattn.gma_attention(*[a.numpy() for a in args], causal=causal,
                                                   key_padding_mask=p.mask.numpy(),
                                                   initial_state=tuple(s.numpy() for s in st),
                                                   output_final_state=True)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(S_g, S_w.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(z_g, z_w.numpy(), rtol=1e-6, atol=1e-6)


def test_numpy_read_only_inputs():
    p = make_problem(1, 20, 1, 3, 2, 2, dtype=torch.float64)
    arrs = [t.detach().numpy().copy() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)]
    for a in arrs:
        a.flags.writeable = False
    out = gmattn.gma_attention(*arrs, causal=True)
    ref = reference.naive_gma(*[t.detach() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)], causal=True)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-10, atol=1e-12)


def _sample_args(requires_grad=True, state=True):
    p = make_problem(2, 70, 2, 3, 4, 5, mask=True, state=state, dtype=torch.float64, seed=1)
    S0, z0 = p.state if state else (None, None)
    return p, (p.q, p.k, p.v, p.mu, p.omega, p.alpha, p.mask, S0, z0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_opcheck(causal):
    p, base = _sample_args()
    torch.library.opcheck(forward_op, base + (causal, 1e-6, 1e-4, True, True))
    torch.library.opcheck(forward_op, base + (causal, 1e-6, 1e-4, False, False))
    out, S, z, gq, gk, den = forward_op(*[t.detach() if isinstance(t, torch.Tensor) else t for t in base],
                                        causal, 1e-6, 1e-4, True, True)
    dout = torch.randn_like(out)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in base]
    ends = [(None, None)] if causal else [(None, None), (S, z)]  # bidirectional: with the forward's state
    for S_end, z_end in ends:
        torch.library.opcheck(backward_op, (dout, torch.randn_like(S), torch.randn_like(z), *detached, out, gq, gk,
                                            den, S_end, z_end, causal, 1e-6, 1e-4))


@pytest.mark.parametrize("threads", [1, 2])
def test_bidirectional_backward_with_the_forward_state(threads):
    """The bidirectional backward given the forward's final state (S_end, z_end: what the torch
    front end passes) equals the one that sums the keys' states itself; the core refuses the
    state for a causal backward, or half of it."""
    p, base = _sample_args()
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in base]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, S, z, gq, gk, den = forward_op(*detached, False, 1e-6, 1e-4, True, True)
        dout, dS, dz = torch.randn_like(out), torch.randn_like(S), torch.randn_like(z)
        common = (dout, dS, dz, *detached, out, gq, gk, den)
        summed = backward_op(*common, None, None, False, 1e-6, 1e-4)
        given = backward_op(*common, S, z, False, 1e-6, 1e-4)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(summed, given):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="S_end.*bidirectional backward only"):
        backward_op(*common, S, z, True, 1e-6, 1e-4)
    with pytest.raises(ValueError, match="S_end.*z_end must be given together"):
        backward_op(*common, S, None, False, 1e-6, 1e-4)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    p = make_problem(2, 80, 2, 4, 8, 8, mask=True, state=True, dtype=torch.float32, seed=31)

    def step(q, k, v, mu, omega, alpha, S0, z0, mask):
        out, (S, z) = gmattn.gma_attention(torch.tanh(q), k * 2, v, mu, omega, alpha, causal=True,
                                           key_padding_mask=mask, initial_state=(S0, z0), output_final_state=True)
        return out.square().mean() + S.mean() + z.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = p.tensors() + [p.mask]
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, p.tensors())
    loss_e = step(*args)
    grads_e = torch.autograd.grad(loss_e, p.tensors())
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_layer():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = gmattn.torch.GaussianMixtureAttention(32, 4, 8, causal=True)
    x = torch.randn(2, 50, 32)
    compiled = torch.compile(layer, fullgraph=True)
    y_c = compiled(x)
    torch.testing.assert_close(y_c, layer(x), rtol=1e-5, atol=1e-6)
    y_c.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


# --------------------------------------------------------------------------------------------
# Each ISA build of the CPU kernels agrees with the reference.

def _supported_isas():
    import gmattn._core as core

    best = core.isa
    order = ["generic", "avx2", "avx512"]
    return order[: order.index(best) + 1] if best in order else ["generic"]


# (K, D, Dv) for each ISA build: D and Dv off the vector width, then K and D over 32, 64, 128 (the
# kernels' multi-vector tiles, the AVX-512 float32 path's K = D = 64 included).
ISA_SIZES = [(16, 20, 12), (32, 32, 32), (64, 64, 64), (128, 128, 128), (32, 128, 64), (128, 32, 64),
             (64, 128, 32)]
# Bounds relative to the largest value of each tensor, about 2.5x above the worst measured over
# the builds, sizes, directions and tensors: float64 6e-14; float32 by D (the log-densities sum D
# terms): 3e-6 at D = 20, 1.3e-5 at 32 and 64, 5.3e-5 at 128 (dmu, K = 32; plain PyTorch's float32
# naive_gma reaches 1.1e-5 there).
def isa_tolerance(dtype: str, D: int) -> float:
    if dtype == "float64":
        return 1.5e-13
    return 1e-5 if D < 32 else 3e-5 if D <= 64 else 1.2e-4


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_each_isa_build_matches_reference(isa):
    """Each ISA build, forced with GMATTN_CPU_ISA in a fresh process, against naive_gma in float64
    on the same values: outputs, final state and every gradient, float32 and float64, causal and
    bidirectional, with a mask and an initial state (N = 70: a full chunk and a ragged one)."""
    if isa not in _supported_isas():
        pytest.skip(f"{isa} not supported on this machine")
    script = textwrap.dedent(
        """
        import json, sys, torch, gmattn
        sys.path.insert(0, sys.argv[1])
        from conftest import make_problem
        from gmattn import reference
        import gmattn._core as core
        assert core.isa == sys.argv[2], core.isa
        names = ["out", "S", "z", "dq", "dk", "dv", "dmu", "domega", "dalpha", "dS0", "dz0"]
        errors = []
        for K, D, Dv in json.loads(sys.argv[3]):
            p32 = make_problem(1, 70, 2, K, D, Dv, mask=True, state=True, dtype=torch.float32, seed=K + D)
            p64 = p32.detached(torch.float64)  # the same values
            for causal in (False, True):
                res = {}
                for run, fn, x in (("ref", reference.naive_gma, p64.detached()), ("float64", gmattn.gma_attention, p64),
                                   ("float32", gmattn.gma_attention, p32)):
                    x = x.detached()
                    out, (S, z) = fn(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal,
                                     key_padding_mask=x.mask, initial_state=x.state, output_final_state=True)
                    g = torch.Generator().manual_seed(0)
                    loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum()
                               for t in (out, S, z))
                    res[run] = [out, S, z, *torch.autograd.grad(loss, x.tensors())]
                rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                for i, name in enumerate(names):
                    b = res["ref"][i]
                    for dtype in ("float64", "float32"):
                        errors.append([K, D, Dv, dtype, causal, name, rel(res[dtype][i], b)])
        print(json.dumps(errors))
        """
    )
    env = dict(os.environ, GMATTN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), isa, json.dumps(ISA_SIZES)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    errors = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(errors) == len(ISA_SIZES) * 2 * 11 * 2
    bad = [e for e in errors if not e[6] <= isa_tolerance(e[3], e[1])]
    assert not bad, "\n".join(f"{isa} K={K} D={D} Dv={Dv} {dt} causal={c} {n}: {err:.2e} > {isa_tolerance(dt, D):.1e}"
                              for K, D, Dv, dt, c, n, err in bad)


def test_isa_override_rejects_unknown_value():
    env = dict(os.environ, GMATTN_CPU_ISA="sse9")
    script = "import numpy as np, gmattn; gmattn.gma_attention(*[np.ones(s, np.float32) for s in " \
             "[(1,2,1,2),(1,2,1,2),(1,2,1,2),(1,3,2),(1,3,2),(1,3)]])"
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "GMATTN_CPU_ISA" in res.stderr
