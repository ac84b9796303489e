"""Short calls and the one-token decoding step: the routes that cut their fixed cost give the
float64 reference's results (outputs, states, gradients).

- torch without gradients on CPU calls the core directly, not through the custom op: the same
  numbers bit for bit, and the op still serves autograd and tracing;
- the core keeps prepared mixtures (variances, log-determinants, prior) for later calls with the
  same parameter values: a change of the parameters, in place or not, is never served stale;
- a call with very little work runs on one thread, with any thread count asked for;
- the torch front end hands the CPU module DLPack capsules; the module takes only unused ones;
- the argument checks accept a plainly valid call quickly and agree with the full checks;
- sequences of at most ROW_PATH_ROWS tokens take the core's row-at-a-time path (cpp/cpu/step.h):
  its outputs, saved tensors (hence gradients) and states are the reference's, and a chain of
  one-token steps equals one chunked call;
- the kernels flush subnormals to zero on every thread they run on and put the caller's setting
  back;
- NumPy decoding can update its carried state in place (state_in_place=True), never silently.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import gmattn
from gmattn import _checks, _ext, reference
from gmattn.torch import ops

from conftest import make_problem

TOL64 = dict(rtol=1e-9, atol=1e-11)


def _decode_inputs(steps, B=2, H=3, K=6, D=5, Dv=4, dtype=torch.float64, seed=0):
    p = make_problem(B, steps, H, K, D, Dv, state=True, dtype=dtype, seed=seed)
    return [t.detach() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)], tuple(s.detach() for s in p.state)


def _reference(q, k, v, mu, omega, alpha, state, causal=True, mask=None):
    out, st = reference.naive_gma(*(t.double() for t in (q, k, v, mu, omega, alpha)), causal=causal,
                                  key_padding_mask=mask, initial_state=tuple(s.double() for s in state),
                                  output_final_state=True)
    return out, st


def _at_thread_counts(run, counts=(1, 2, 3)):
    """[run() at each torch thread count of `counts` in turn]; the caller's count put back after."""
    before = torch.get_num_threads()
    try:
        results = []
        for threads in counts:
            torch.set_num_threads(threads)
            results.append(run())
        return results
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_token_steps_match_the_reference(framework, dtype):
    """Token by token with the carried state (every step one call of N = 1): each output and the
    final state equal one call of the float64 reference over the whole sequence."""
    (q, k, v, mu, omega, alpha), state = _decode_inputs(7, dtype=dtype)
    want, want_state = _reference(q, k, v, mu, omega, alpha, state)
    tol = TOL64 if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    convert = (lambda t: t) if framework == "torch" else (lambda t: t.numpy())
    params = [convert(t) for t in (mu, omega, alpha)]
    carried = tuple(convert(s) for s in state)
    outs = []
    with torch.no_grad():
        for i in range(q.shape[1]):
            x = [convert(t[:, i:i + 1]) for t in (q, k, v)]
            out, carried = gmattn.gma_attention(*x, *params, causal=True, initial_state=carried,
                                                output_final_state=True)
            outs.append(torch.as_tensor(out))
    torch.testing.assert_close(torch.cat(outs, 1).double(), want, **tol)
    for got, ref in zip(carried, want_state):
        torch.testing.assert_close(torch.as_tensor(got).double(), ref, **tol)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("N", [1, 3, 70])
def test_direct_route_equals_the_custom_op(causal, N, monkeypatch):
    """Without gradients the torch front end calls the core directly: bit for bit what the custom
    op computes, and the custom op is not called; with gradients it is."""
    p = make_problem(2, N, 3, 5, 4, 6, mask=True, state=True, dtype=torch.float32, seed=3)
    args = [t.detach() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)]
    state = tuple(s.detach() for s in p.state)
    via_op = ops.forward_op(*args, p.mask, *state, causal, 1e-6, 1e-4, True, False)
    calls = []
    original = ops.forward_op
    monkeypatch.setattr(ops, "forward_op", lambda *a: calls.append(1) or original(*a))
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out, (S, z) = gmattn.gma_attention(*args, causal=causal, key_padding_mask=p.mask, initial_state=state,
                                               output_final_state=True)
        assert not calls, f"the custom op ran under {context.__name__}"
        for got, want in zip((out, S, z), via_op[:3]):
            assert torch.equal(got, want)
    grad_args = [t.clone().requires_grad_() for t in args]
    gmattn.gma_attention(*grad_args, causal=causal, key_padding_mask=p.mask, initial_state=state)
    assert not calls, "the custom op ran for an eager CPU call that needs gradients"
    compiled = torch.compile(lambda *a: gmattn.gma_attention(*a, causal=causal, key_padding_mask=p.mask),
                             backend="eager", fullgraph=True)
    compiled(*grad_args)
    assert calls, "the custom op did not run under torch.compile"


def _grad_problem(causal, packed, seed=3):
    """Inputs for a call with gradients: (args, kwargs, output gradients), with a mask and state
    (or packed sequences with their states)."""
    if packed:
        p = make_problem(1, 29, 3, 5, 4, 6, dtype=torch.float64, seed=seed)
        offsets = torch.tensor([0, 1, 5, 17, 29])
        g = torch.Generator().manual_seed(seed)
        state = (torch.rand(4, 3, 5, 6, generator=g, dtype=torch.float64).requires_grad_(),
                 (torch.rand(4, 3, 5, generator=g, dtype=torch.float64) + 0.1).requires_grad_())
        kwargs = dict(causal=causal, initial_state=state, cu_seqlens=offsets, output_final_state=True)
    else:
        p = make_problem(2, 37, 3, 5, 4, 6, mask=True, state=True, dtype=torch.float64, seed=seed)
        kwargs = dict(causal=causal, key_padding_mask=p.mask, initial_state=p.state, output_final_state=True)
        state = p.state
    args = (p.q, p.k, p.v, p.mu, p.omega, p.alpha)
    g = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(p.q.shape[:3] + (6,), generator=g, dtype=torch.float64),
             torch.randn(state[0].shape, generator=g, dtype=torch.float64),
             torch.randn(state[1].shape, generator=g, dtype=torch.float64)]
    return args, kwargs, grads


def _value_and_grads(args, kwargs, grads):
    leaves = list(args) + list(kwargs["initial_state"])
    for t in leaves:
        t.grad = None
    out, (S, z) = gmattn.gma_attention(*args, **kwargs)
    torch.autograd.backward((out, S, z), grads)
    return [t.detach().clone() for t in (out, S, z)] + [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_direct_autograd_route_equals_the_custom_op(causal, packed, monkeypatch):
    """An eager CPU call with gradients runs the kernels through a plain autograd.Function: the
    outputs, states and every gradient (including those of the initial state, through the final
    state's gradient) are bit for bit the custom op's, and both are the float64 reference's."""
    args, kwargs, grads = _grad_problem(causal, packed)
    direct = _value_and_grads(args, kwargs, grads)
    monkeypatch.setattr(ops, "_direct_call_allowed", lambda *tensors: False)
    via_op = _value_and_grads(args, kwargs, grads)
    for got, want in zip(direct, via_op):
        assert torch.equal(got, want)
    leaves = [t.detach().clone().requires_grad_() for t in list(args) + list(kwargs["initial_state"])]
    ref_kwargs = dict(kwargs, initial_state=tuple(leaves[6:]))
    if packed:  # the reference per sequence, one after another
        offsets = ref_kwargs.pop("cu_seqlens").tolist()
        outs, Ss, zs = [], [], []
        for i, (a, b) in enumerate(zip(offsets, offsets[1:])):
            o, (S, z) = reference.naive_gma(*(t[:, a:b] for t in leaves[:3]), *leaves[3:6], causal=causal,
                                            initial_state=(leaves[6][i:i + 1], leaves[7][i:i + 1]),
                                            output_final_state=True)
            outs.append(o), Ss.append(S), zs.append(z)
        ref = (torch.cat(outs, 1), torch.cat(Ss), torch.cat(zs))
    else:
        ref_out, ref_state = reference.naive_gma(*leaves[:6], **ref_kwargs)
        ref = (ref_out, *ref_state)
    torch.autograd.backward(ref, grads)
    for got, want in zip(direct, [t.detach() for t in ref] + [t.grad for t in leaves]):
        torch.testing.assert_close(got, want, **TOL64)


def test_direct_autograd_route_keeps_autograds_guarantees():
    """What autograd promises for the custom op holds on the direct route too: an input modified
    in place after the call is an error at backward (not a wrong gradient), saved-tensor hooks see
    the saved tensors, activation checkpointing recomputes to the same gradients, and a second
    derivative is refused clearly."""
    p = make_problem(1, 9, 2, 3, 4, 4, dtype=torch.float64, seed=7)
    args = (p.q, p.k, p.v, p.mu, p.omega, p.alpha)
    q = p.q.detach().clone().requires_grad_()
    x = q * 1.0
    out = gmattn.gma_attention(x, *args[1:], causal=True)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()

    packed_count = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed_count.append(1) or t, lambda t: t):
        out = gmattn.gma_attention(*args, causal=True)
    assert packed_count, "saved-tensor hooks did not see the direct route's saved tensors"
    out.sum().backward()
    want = [t.grad.clone() for t in args]

    for t in args:
        t.grad = None
    from torch.utils.checkpoint import checkpoint
    checkpoint(lambda *a: gmattn.gma_attention(*a, causal=True), *args, use_reentrant=False).sum().backward()
    for t, w in zip(args, want):
        assert torch.equal(t.grad, w)

    out = gmattn.gma_attention(*args, causal=True)
    (dq,) = torch.autograd.grad(out.sum(), p.q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        dq.sum().backward()


def test_torch_func_transforms_do_not_take_the_direct_route():
    """Under a torch.func transform the tensors a function sees are wrappers whose memory is not
    theirs to hand to the kernels: the direct routes are closed (the custom op sees them)."""
    p = make_problem(1, 6, 2, 3, 4, 4, dtype=torch.float64, seed=2)
    args = [t.detach() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)]
    seen = []

    def f(q):
        seen.append(ops._direct_call_allowed(q, *args[1:]))
        return q.sum()

    torch.func.grad(f)(args[0])
    torch.func.vmap(f)(args[0])
    assert seen == [False, False]
    assert ops._direct_call_allowed(*args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("N", [1, 3, 70])
def test_torch_step_route_equals_the_custom_op(N, causal, dtype, monkeypatch):
    """Without gradients, mask or packed sequences, an eager CPU call goes through the core's plain
    entry `step` (not the general entry): bit for bit what the custom op computes, with and without
    a carried state, the final state asked for or not. Where `step` refuses (a state in another
    dtype than the accumulator's), the general route casts it and runs: the same numbers."""
    p = make_problem(2, N, 3, 5, 4, 6, state=True, dtype=dtype, seed=4)
    args = [t.detach() for t in (p.q, p.k, p.v)] + [t.detach().to(ops._ACC[dtype]) for t in (p.mu, p.omega, p.alpha)]
    state = tuple(s.detach().to(ops._ACC[dtype]) for s in p.state)
    general = []
    original = ops._run_forward
    monkeypatch.setattr(ops, "_run_forward", lambda *a, **kw: general.append(1) or original(*a, **kw))
    for initial_state in (None, state):
        via_op = ops.forward_op(*args, None, *(initial_state or (None, None)), causal, 1e-6, 1e-4, True, False)
        general.clear()  # (the op ran the general route)
        with torch.no_grad():
            out, (S, z) = gmattn.gma_attention(*args, causal=causal, initial_state=initial_state,
                                               output_final_state=True)
            alone = gmattn.gma_attention(*args, causal=causal, initial_state=initial_state)
        assert not general, "the call did not take the step route"
        for got, want in zip((out, S, z, alone), (*via_op[:3], via_op[0])):
            assert got.dtype == want.dtype and torch.equal(got, want)
    other = tuple(s.to(torch.float64 if ops._ACC[dtype] == torch.float32 else torch.float32) for s in state)
    with torch.no_grad():
        out = gmattn.gma_attention(*args, causal=causal, initial_state=other)
    assert general, "a state in another dtype did not take the general route"
    via_op = ops.forward_op(*args, None, *(s.to(ops._ACC[dtype]) for s in other), causal, 1e-6, 1e-4, False, False)
    assert torch.equal(out, via_op[0])


@pytest.mark.parametrize("needs_grad", [False, True])
def test_jit_trace_records_the_op(needs_grad):
    """torch.jit.trace records the custom op, not a direct call (which it would keep as constant
    outputs): the traced function computes new inputs' results, with and without gradients."""
    p = make_problem(1, 5, 2, 3, 4, 4, dtype=torch.float64, seed=6)
    args = [t.detach().requires_grad_(needs_grad) for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)]

    def f(*args):
        return gmattn.gma_attention(*args, causal=True)

    with torch.set_grad_enabled(needs_grad):
        traced = torch.jit.trace(f, tuple(args), check_trace=False)
        assert "gmattn::forward" in str(traced.graph)
        other = [torch.randn_like(args[0])] + args[1:]
        got = traced(*other)
        torch.testing.assert_close(got, reference.naive_gma(*other, causal=True), **TOL64)
        if needs_grad:  # the traced op's gradients are autograd's
            got.sum().backward()
            want = torch.autograd.grad(reference.naive_gma(*other, causal=True).sum(), args[1])
            torch.testing.assert_close(args[1].grad, want[0], **TOL64)


def test_negative_bit_views_go_through_the_op():
    """A lazily negated view (its memory holds -x) is resolved by the op's dispatcher: the direct
    route must not read its memory as x."""
    p = make_problem(1, 4, 2, 3, 4, 4, dtype=torch.float64)
    q, k, v, mu, omega, alpha = (t.detach() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha))
    negated = torch.complex(torch.zeros_like(q), -q).conj().imag  # == q, stored negated
    assert negated.is_neg() and torch.equal(negated, q)
    with torch.no_grad():
        got = gmattn.gma_attention(negated, k, v, mu, omega, alpha, causal=True)
    torch.testing.assert_close(got, reference.naive_gma(q, k, v, mu, omega, alpha, causal=True), **TOL64)


def test_direct_route_is_not_taken_under_a_dispatch_mode():
    """A torch dispatch mode (here the one torch.library.opcheck's fake tensors use) sees the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    p = make_problem(1, 2, 2, 3, 4, 4, dtype=torch.float32)
    args = [t.detach() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)]
    with torch.no_grad(), Record():
        gmattn.gma_attention(*args, causal=True)
    assert any("gmattn.forward" in name for name in seen), seen


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_prepared_mixtures_follow_parameter_changes(framework):
    """The parameters changed in place between calls (an optimiser step), or new ones at the same
    or another address: every call equals the reference for the parameters it was given. Also
    more parameter sets than the cache keeps, cycled, and strided (non-contiguous) parameters."""
    (q, k, v, mu, omega, alpha), state = _decode_inputs(3)
    convert = (lambda t: t) if framework == "torch" else (lambda t: t.numpy())

    def check(mu, omega, alpha):
        out, (S, z) = gmattn.gma_attention(*(convert(t) for t in (q, k, v, mu, omega, alpha)), causal=True,
                                           initial_state=tuple(convert(s) for s in state), output_final_state=True)
        want, (want_S, want_z) = _reference(q, k, v, mu, omega, alpha, state)
        for got, ref in ((out, want), (S, want_S), (z, want_z)):
            torch.testing.assert_close(torch.as_tensor(got), ref, **TOL64)

    with torch.no_grad():
        check(mu, omega, alpha)
        check(mu, omega, alpha)  # the same values again
        for p in (mu, omega, alpha):  # in place, one parameter at a time, then back
            convert(p)[..., 0] += 0.25  # (a NumPy view writes the tensor's memory, unseen by torch)
            check(mu, omega, alpha)
            convert(p)[..., 0] -= 0.25
            check(mu, omega, alpha)
        omega.view(-1)[-1] += 1.0  # the last value only
        check(mu, omega, alpha)
        sets = [(mu + 0.1 * i, omega - 0.05 * i, alpha * (1 + i)) for i in range(20)]  # more than the cache keeps
        for _ in range(2):
            for ps in sets:
                check(*ps)
        wide = [torch.stack([t, t + 1], -1) for t in (mu, omega, alpha)]  # the values at stride 2
        check(*(w[..., 0] for w in wide))
        check(mu, omega, alpha)
        check(mu, omega, alpha * 1.0000001)  # one rounding apart


def test_prepared_mixtures_see_every_single_value_change():
    """One value of mu, omega or alpha changed in place, anywhere (first, middle, last; each head),
    in contiguous parameters (compared as one block) and in parameters whose rows are contiguous
    but whose heads are not (compared a row at a time): every NumPy step equals the reference for
    the values it was given, and changing the value back serves the earlier result again."""
    (q, k, v, mu, omega, alpha), state = _decode_inputs(1, H=3, K=6, D=5)
    x = [t.numpy() for t in (q, k, v)]
    S0, z0 = (s.numpy() for s in state)

    def check(mu, omega, alpha):
        out, (S, z) = gmattn.gma_attention(*x, mu, omega, alpha, causal=True, initial_state=(S0, z0),
                                           output_final_state=True)
        want, (want_S, want_z) = _reference(q, k, v, *(torch.from_numpy(np.ascontiguousarray(p))
                                                        for p in (mu, omega, alpha)), state)
        for got, ref in ((out, want), (S, want_S), (z, want_z)):
            torch.testing.assert_close(torch.from_numpy(got), ref, **TOL64)

    contiguous = [t.numpy().copy() for t in (mu, omega, alpha)]
    heads_apart = [np.ascontiguousarray(np.swapaxes(t.numpy(), 0, 1)).swapaxes(0, 1) for t in (mu, omega, alpha)]
    assert not heads_apart[0].flags.c_contiguous and heads_apart[0].strides[-1] == 8
    for params in (contiguous, heads_apart):
        check(*params)
        for p in params:
            for index in (0, p.size // 2, p.size - 1):
                at = np.unravel_index(index, p.shape)
                old = p[at]
                p[at] = old + 0.125
                check(*params)
                p[at] = old
                check(*params)


def test_sigma_eps_is_part_of_the_prepared_mixture():
    (q, k, v, mu, omega, alpha), state = _decode_inputs(2)
    with torch.no_grad():
        for sigma_eps in (1e-4, 1e-2, 1e-4):
            got = gmattn.gma_attention(q, k, v, mu, omega, alpha, causal=True, initial_state=state, sigma_eps=sigma_eps)
            want = reference.naive_gma(q, k, v, mu, omega, alpha, causal=True, initial_state=state,
                                       sigma_eps=sigma_eps)
            torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_tiny_calls_agree_at_any_thread_count(causal):
    """A call with very little work runs on one thread whatever is asked: the results (outputs,
    state, every gradient) are the reference's at 1, 2 and 3 threads, and identical to each other."""
    p = make_problem(1, 3, 2, 4, 3, 3, mask=True, state=True, dtype=torch.float64, seed=5)
    ref_out, ref_state = _reference(p.q, p.k, p.v, p.mu, p.omega, p.alpha, p.state, causal=causal, mask=p.mask)

    def run():
        x = p.detached()
        out, (S, z) = gmattn.gma_attention(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal,
                                           key_padding_mask=x.mask, initial_state=x.state, output_final_state=True)
        for got, want in ((out, ref_out), (S, ref_state[0]), (z, ref_state[1])):
            torch.testing.assert_close(got.detach(), want.detach(), **TOL64)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + S.sum() - z.sum()
        return [out.detach()] + list(torch.autograd.grad(loss, x.tensors()))

    results = _at_thread_counts(run)
    x = p.detached()
    out, (S, z) = reference.naive_gma(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal, key_padding_mask=x.mask,
                                      initial_state=x.state, output_final_state=True)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + S.sum() - z.sum()
    want_grads = torch.autograd.grad(loss, x.tensors())
    for got in results:
        for a, b in zip(got[1:], want_grads):
            torch.testing.assert_close(a, b, **TOL64)
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b)


def test_the_cpu_module_takes_dlpack_capsules_once():
    """The CPU module takes a DLPack capsule as an array (the torch front end's route); a capsule
    that is not an unused DLPack tensor is refused with the argument's name."""
    p = make_problem(1, 2, 2, 3, 4, 4, dtype=torch.float32)
    args = [t.detach() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)]
    out = torch.empty_like(args[2])
    core = _ext.core()
    core.forward(*(torch._C._to_dlpack(t) for t in args), None, None, None, torch._C._to_dlpack(out), None, None,
                 None, None, None, True, 1e-6, 1e-4, 1, 0, None)
    with torch.no_grad():
        torch.testing.assert_close(out, ops.forward_op(*args, None, None, None, True, 1e-6, 1e-4, False, False)[0],
                                   rtol=0, atol=0)
    used = torch._C._to_dlpack(args[1])
    torch.from_dlpack(used)  # consumes it: renamed "used_dltensor"
    with pytest.raises(ValueError, match="'k' is a capsule but not an unused DLPack tensor"):
        core.forward(args[0], used, *args[2:], None, None, None, out, None, None, None, None, None, True, 1e-6, 1e-4,
                     1, 0, None)


def _valid_calls():
    p = make_problem(2, 5, 3, 4, 6, 7, mask=True, state=True, dtype=torch.float32)
    args = [t.detach() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)]
    yield args, p.mask, p.state
    yield args, None, None
    yield [a.numpy() for a in args], p.mask.numpy(), tuple(s.detach().numpy() for s in p.state)
    half = [a.to(torch.bfloat16) for a in args[:3]] + args[3:]
    yield half, None, None


def test_quick_acceptance_agrees_with_the_full_checks(monkeypatch):
    """check_arguments accepts a plainly valid call without the full checks: the same Dims as the
    full checks give; a call with anything wrong is left to the full checks, which name the argument."""
    calls = list(_valid_calls())
    quick = [_checks._plainly_valid(*args, mask, state, 1e-6, 1e-4) for args, mask, state in calls]
    with monkeypatch.context() as m:
        m.setattr(_checks, "_plainly_valid", lambda *a: None)  # the full checks alone
        full = [_checks.check_arguments(*args, mask, state, 1e-6, 1e-4) for args, mask, state in calls]
    for (args, _, _), q, f in zip(calls, quick, full):
        assert q is not None and q == f == _checks.Dims(B=2, N=5, H=3, K=4, D=6, Dv=7,
                                                      dtype=_checks.dtype_name(args[0].dtype))
    args, mask, state = next(_valid_calls())
    q, k, v, mu, omega, alpha = args
    wrong = {
        "k": (q, k[:, :4], v, mu, omega, alpha, mask, state),
        "v": (q, k, v[:, :, :2], mu, omega, alpha, mask, state),
        "omega": (q, k, v, mu, omega[:, :3], alpha, mask, state),
        "alpha": (q, k, v, mu, omega, alpha.double(), mask, state),
        "key_padding_mask": (q, k, v, mu, omega, alpha, mask.float(), state),
        "initial_state": (q, k, v, mu, omega, alpha, mask, state[:1]),
        "k dtype": (q, k.double(), v, mu, omega, alpha, mask, state),
    }
    for name, call in wrong.items():
        assert _checks._plainly_valid(*call, 1e-6, 1e-4) is None, name
        with pytest.raises((ValueError, TypeError), match=name.split()[0]):
            _checks.check_arguments(*call, 1e-6, 1e-4)
    for eps, sigma_eps in ((-1.0, 1e-4), (1e-6, 0.0), (float("nan"), 1e-4), (1e-6, float("inf"))):
        assert _checks._plainly_valid(*args, mask, state, eps, sigma_eps) is None
        with pytest.raises(ValueError, match="eps"):
            _checks.check_arguments(*args, mask, state, eps, sigma_eps)


# ---------------------------------------------------------------------------------------------
# The row-at-a-time path of short sequences (cpp/cpu/step.h, kRowPathRows)

ROW_PATH_ROWS = 4  # kRowPathRows: sequences up to this long take the row path, longer ones chunks


def _loss_grads(out, S, z, tensors):
    g = torch.Generator().manual_seed(11)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (out, S, z)]
    return torch.autograd.grad((out, S, z), tensors, cot)


def _assert_gradients_match_reference(p, causal, out, S, z, x):
    """Every input gradient of the loss over (out, S, z) computed from x equals naive_gma's in float64."""
    got_grads = _loss_grads(out, S, z, x.tensors())
    r = p.detached()
    ro, (rS, rz) = reference.naive_gma(r.q, r.k, r.v, r.mu, r.omega, r.alpha, causal=causal, key_padding_mask=r.mask,
                                       initial_state=r.state, output_final_state=True)
    for got, ref in zip(got_grads, _loss_grads(ro, rS, rz, r.tensors())):
        torch.testing.assert_close(got, ref, **TOL64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("N", [1, 2, ROW_PATH_ROWS, ROW_PATH_ROWS + 1])
@pytest.mark.parametrize("mask", [False, True], ids=["", "mask"])
@pytest.mark.parametrize("state", [True, False], ids=["state", "nostate"])
def test_short_sequences_match_the_reference(causal, N, mask, state):
    """Around the row path's bound (ROW_PATH_ROWS rows: row path; one more: chunks), float64:
    outputs and final states without gradients (the direct route) and with them (the op, whose
    forward saves the responsibilities the backward reads), and every gradient, equal the
    float64 reference."""
    p = make_problem(3, N, 2, 7, 5, 6, mask=mask, state=state, dtype=torch.float64, seed=N)
    if mask:
        p.mask[:, 0] = N == 1 or bool(p.mask[0, 0])  # a masked first token too, when N > 1
        p.mask[1, 0] = False if N > 1 else True
    x = p.detached()
    want = reference.naive_gma(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal, key_padding_mask=x.mask,
                               initial_state=x.state, output_final_state=True)
    want = [want[0], *want[1]]
    with torch.no_grad():
        out, (S, z) = gmattn.gma_attention(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal,
                                           key_padding_mask=x.mask, initial_state=x.state, output_final_state=True)
    for got, ref in zip((out, S, z), want):
        torch.testing.assert_close(got, ref.detach(), **TOL64)
    x = p.detached()
    out, (S, z) = gmattn.gma_attention(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal, key_padding_mask=x.mask,
                                       initial_state=x.state, output_final_state=True)
    for got, ref in zip((out, S, z), want):
        torch.testing.assert_close(got.detach(), ref.detach(), **TOL64)
    _assert_gradients_match_reference(p, causal, out, S, z, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_row_path_agrees_with_the_chunked_path(dtype, causal):
    """The same short problem through the row path and through chunks: causal, the first
    ROW_PATH_ROWS outputs of a longer call (chunked) and a call of those rows alone (rows);
    bidirectional, a call whose extra keys are masked out (chunked) against the short call. Both
    within a few roundings of the float64 reference, in every dtype (16-bit q, k, v: within
    plain float32 rounding of the widened inputs)."""
    n, long_n = ROW_PATH_ROWS, ROW_PATH_ROWS + 9
    p = make_problem(2, long_n, 3, 16, 24, 20, mask=True, state=True, dtype=dtype, seed=4)
    x = p.detached()
    mask = x.mask.clone()
    if not causal:
        mask[:, n:] = False
    with torch.no_grad():
        short, (S_s, z_s) = gmattn.gma_attention(x.q[:, :n], x.k[:, :n], x.v[:, :n], x.mu, x.omega, x.alpha,
                                                 causal=causal, key_padding_mask=mask[:, :n], initial_state=x.state,
                                                 output_final_state=True)
        long, _ = gmattn.gma_attention(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal, key_padding_mask=mask,
                                       initial_state=x.state, output_final_state=True)
    ref = reference.naive_gma(*(t.double() for t in (x.q[:, :n], x.k[:, :n], x.v[:, :n], x.mu, x.omega, x.alpha)),
                              causal=causal, key_padding_mask=mask[:, :n],
                              initial_state=tuple(s.double() for s in x.state), output_final_state=True)
    if dtype == torch.float64:
        tol = TOL64
    elif dtype == torch.float32:
        tol = dict(rtol=1e-5, atol=1e-6)
    else:  # the outputs are rounded to bfloat16 (8 bits)
        tol = dict(rtol=1.6e-2, atol=1e-3)
    state_tol = TOL64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short.double(), ref[0], **tol)
    torch.testing.assert_close(long[:, :n].double(), ref[0], **tol)
    torch.testing.assert_close(short.double(), long[:, :n].double(), **tol)
    for got, want in zip((S_s, z_s), ref[1]):
        torch.testing.assert_close(got.double(), want, **state_tol)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_row_backward_runs_of_sequences_at_any_thread_count(causal):
    """The row path's backward cuts each head's sequences into runs (a task each) and adds the
    runs' parameter sums in order: with more sequences than a run holds, every gradient (and the
    initial state's) equals the float64 reference at 1, 2 and 3 threads, the same bits at each."""
    p = make_problem(40, 2, 3, 32, 32, 32, mask=True, state=True, dtype=torch.float64, seed=9)
    r = p.detached()
    ro, (rS, rz) = reference.naive_gma(r.q, r.k, r.v, r.mu, r.omega, r.alpha, causal=causal, key_padding_mask=r.mask,
                                       initial_state=r.state, output_final_state=True)
    want = _loss_grads(ro, rS, rz, r.tensors())

    def run():
        x = p.detached()
        out, (S, z) = gmattn.gma_attention(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal,
                                           key_padding_mask=x.mask, initial_state=x.state, output_final_state=True)
        return _loss_grads(out, S, z, x.tensors())

    results = _at_thread_counts(run)
    for got in results:
        for a, b, w in zip(got, results[0], want):
            torch.testing.assert_close(a, w, **TOL64)
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_row_backward_low_precision_error_within_the_chunked_paths(dtype, causal):
    """Gradients in float32 and bfloat16 from the row path's backward are as accurate as the
    chunked backward's on the same problem: error against the float64 reference within twice the
    chunked path's (plus a few float32 roundings). Causal, the chunked call is longer with no
    gradient reaching its extra rows; bidirectional, its extra keys are masked out."""
    n, long_n = ROW_PATH_ROWS, ROW_PATH_ROWS + 9
    p = make_problem(2, long_n, 3, 16, 24, 20, mask=True, state=True, dtype=torch.float64, seed=12)
    mask = p.mask.clone()
    mask[:, 0] = True
    if not causal:
        mask[:, n:] = False
    g = torch.Generator().manual_seed(3)
    cot = torch.randn(2, long_n, 3, 20, generator=g, dtype=torch.float64)
    cot[:, n:] = 0

    acc = torch.float32
    # the inputs as the low-precision calls see them (q, k, v rounded to dtype, the rest to
    # float32), so that the reference's difference is the computation's error alone
    inputs = [t.detach().to(dtype if i < 3 else acc).double() for i, t in enumerate((p.q, p.k, p.v, p.mu, p.omega,
                                                                                     p.alpha, *p.state))]

    def grads(length, dt):
        x = [t.to(dt if i < 3 else acc if dt != torch.float64 else dt).requires_grad_() for i, t in enumerate(inputs)]
        q, k, v = (t[:, :length] for t in x[:3])
        out, (S, z) = gmattn.gma_attention(q, k, v, *x[3:6], causal=causal, key_padding_mask=mask[:, :length],
                                           initial_state=tuple(x[6:]), output_final_state=True)
        loss = (out.double() * cot[:, :length]).sum() + S.double().sum() - z.double().sum()
        got = torch.autograd.grad(loss, x)
        return [gr[:, :n] if i < 3 else gr for i, gr in enumerate(got)]

    want = grads(n, torch.float64)
    rows, chunks = grads(n, dtype), grads(long_n, dtype)
    for r, c, w in zip(rows, chunks, want):
        scale = w.abs().max().item() + 1e-30
        row_err = (r.double() - w).abs().max().item() / scale
        chunk_err = (c.double() - w).abs().max().item() / scale
        assert row_err <= 2 * chunk_err + 1e-7, (row_err, chunk_err)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_one_token_step_with_any_state_layout(causal, layout):
    """A one-token step reads its state from S0 and writes S_final directly when their rows are
    contiguous, through working memory otherwise: both give the reference's outputs, states and
    saved-responsibility gradients."""
    p = make_problem(2, 1, 3, 6, 5, 7, mask=True, state=True, dtype=torch.float64, seed=12)
    x = p.detached()
    if layout == "strided":  # S0 with its Dv axis outermost, z0 at stride 2
        S0 = x.state[0].detach().permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0).requires_grad_()
        z0 = torch.stack([x.state[1].detach()] * 2, -1)[..., 0].requires_grad_()
        assert S0.stride()[-1] != 1 and z0.stride()[-1] == 2
        x = dataclasses.replace(x, state=(S0, z0))
    want = reference.naive_gma(*(t.detach() for t in (x.q, x.k, x.v, x.mu, x.omega, x.alpha)), causal=causal,
                               key_padding_mask=x.mask, initial_state=tuple(s.detach() for s in x.state),
                               output_final_state=True)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out, (S, z) = gmattn.gma_attention(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal,
                                               key_padding_mask=x.mask, initial_state=x.state,
                                               output_final_state=True)
        for got, ref in zip((out, S, z), (want[0], *want[1])):
            torch.testing.assert_close(got.detach(), ref, **TOL64)
    _assert_gradients_match_reference(p, causal, out, S, z, x)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_one_token_steps_chain_to_one_chunked_call(framework):
    """float32, 150 one-token steps with the carried state (each on the row path; some tokens
    masked) equal one chunked call over the 150 tokens, and both the float64 reference."""
    steps = 150
    p = make_problem(2, steps, 4, 16, 8, 12, mask=True, state=True, dtype=torch.float32, seed=21)
    x = p.detached()
    convert = (lambda t: t) if framework == "torch" else (lambda t: t.detach().numpy())
    params = [convert(t) for t in (x.mu, x.omega, x.alpha)]
    carried = tuple(convert(s) for s in x.state)
    outs = []
    with torch.no_grad():
        for i in range(steps):
            rows = [convert(t[:, i:i + 1]) for t in (x.q, x.k, x.v)]
            out, carried = gmattn.gma_attention(*rows, *params, causal=True,
                                                key_padding_mask=convert(x.mask[:, i:i + 1]), initial_state=carried,
                                                output_final_state=True)
            outs.append(torch.as_tensor(out))
        whole, whole_state = gmattn.gma_attention(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=True,
                                                  key_padding_mask=x.mask, initial_state=x.state,
                                                  output_final_state=True)
    ref, ref_state = _reference(x.q, x.k, x.v, x.mu, x.omega, x.alpha, x.state, mask=x.mask)
    stepped = torch.cat(outs, 1)
    torch.testing.assert_close(stepped, whole, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(stepped.double(), ref, rtol=2e-5, atol=2e-6)
    for got, chunked, want in zip(carried, whole_state, ref_state):
        torch.testing.assert_close(torch.as_tensor(got), chunked, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(torch.as_tensor(got).double(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("lengths", [[1, 0, 3, 4, 1, 2], [4], [0, 1]], ids=["mixed", "one", "empty_first"])
def test_packed_short_sequences_take_the_row_path(causal, lengths):
    """Packed sequences of at most ROW_PATH_ROWS tokens (empty ones too): outputs, final states
    and every gradient equal the reference on each sequence alone."""
    g = torch.Generator().manual_seed(2)
    H, K, D, Dv, S, N = 2, 5, 4, 6, len(lengths), sum(lengths)
    shapes = [(1, N, H, D), (1, N, H, D), (1, N, H, Dv), (H, K, D), (H, K, D), (H, K), (S, H, K, Dv), (S, H, K)]
    tensors = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    tensors[-2:] = [t.abs() + 0.1 for t in tensors[-2:]]
    tensors = [t.requires_grad_() for t in tensors]
    offsets = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int64)

    def run(fn):
        q, k, v, mu, omega, alpha, S0, z0 = tensors
        out, (S_, z_) = fn(q, k, v, mu, omega, alpha, causal=causal, initial_state=(S0, z0), output_final_state=True,
                           cu_seqlens=offsets)
        return [out, S_, z_], _loss_grads(out, S_, z_, tensors)

    got, got_grads = run(gmattn.gma_attention)
    want, want_grads = run(lambda *a, cu_seqlens, **kw: reference.packed_gma(*a, cu_seqlens, **kw))
    for a, b in zip(got + list(got_grads), want + list(want_grads)):
        torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_batched_steps_on_several_threads(causal):
    """A one-token step of many sequences has enough work for several threads (the row path runs
    its (sequence, head) pairs in parallel): the reference's results at 1, 2 and 3 threads, the
    same bits at each."""
    p = make_problem(48, 1, 8, 32, 32, 32, mask=True, state=True, dtype=torch.float32, seed=8)
    x = p.detached()
    ref, ref_state = _reference(x.q, x.k, x.v, x.mu, x.omega, x.alpha, x.state, causal=causal, mask=x.mask)

    def run():
        with torch.no_grad():
            out, (S, z) = gmattn.gma_attention(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal,
                                               key_padding_mask=x.mask, initial_state=x.state, output_final_state=True)
        return out, S, z

    results = _at_thread_counts(run)
    for got in results:
        for a, b, want in zip(got, results[0], (ref, *ref_state)):
            assert torch.equal(a, b)
            # (float32 responsibilities carry ~eps |s| relative error, |s| ~ 50 nats here; the
            # chunked path's error on these inputs is larger still)
            torch.testing.assert_close(a.double(), want, rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Subnormals flushed inside the kernels, the caller's setting kept

def _subnormals_survive() -> bool:
    """Whether this thread's float32 arithmetic yields subnormal results (no flush to zero)."""
    tiny = np.float32(1e-38)
    return bool(np.multiply(tiny, np.float32(1e-3)) != 0)


def _far_problem(N, dtype=torch.float32):
    """Far components: many float32 responsibilities below the smallest normal number."""
    p = make_problem(1, N, 2, 16, 4, 5, state=True, dtype=torch.float64, seed=6)
    with torch.no_grad():
        p.mu.mul_(6.0)
        p.omega.fill_(-3.0)
    return [t.detach().to(dtype) for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)], \
        tuple(s.detach().to(dtype) for s in p.state)


@pytest.mark.parametrize("N", [1, 70])
def test_kernels_flush_subnormals_and_restore_the_callers_setting(N):
    """The saved responsibilities of far components hold no subnormal numbers (flushed to zero
    inside the kernels, row path and chunks alike), while the calling thread and torch's worker
    threads still compute subnormals afterwards; forward and backward stay within float32
    rounding of the float64 reference."""
    assert _subnormals_survive()
    (q, k, v, mu, omega, alpha), state = _far_problem(N)
    core = _ext.core()
    B, _, H, _ = q.shape
    K = mu.shape[1]
    gq, gk = np.empty((B, H, N, K), np.float32), np.empty((B, H, N, K), np.float32)
    den, out = np.empty((B, H, N), np.float32), np.empty(v.shape, np.float32)
    core.forward(*(t.numpy() for t in (q, k, v, mu, omega, alpha)), None, *(s.numpy() for s in state), out, None,
                 None, gq, gk, den, True, 1e-6, 1e-4, 2, 0, None)
    for saved in (gq, gk):
        assert saved.min() >= 0 and (saved.max() > 0)
        assert not np.any((saved > 0) & (saved < np.finfo(np.float32).tiny)), "a subnormal responsibility"
    # The float64 responsibilities of these rows do reach below the float32 range of normals.
    ref_g = reference.responsibilities(q.double(), mu.double(), omega.double(),
                                       alpha.double())
    assert bool(((ref_g > 0) & (ref_g < float(np.finfo(np.float32).tiny))).any())
    assert _subnormals_survive(), "the calling thread's flush-to-zero setting was left changed"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = [t.clone().requires_grad_() for t in (q, k, v, mu, omega, alpha)]
        S0, z0 = (s.clone().requires_grad_() for s in state)
        got, (S, z) = gmattn.gma_attention(*x, causal=True, initial_state=(S0, z0), output_final_state=True)
        got_grads = _loss_grads(got, S, z, x + [S0, z0])
        tiny = torch.full((1 << 16,), 1e-38, dtype=torch.float32) * 1e-3  # on torch's threads
        assert bool((tiny != 0).all()), "a worker thread's flush-to-zero setting was left changed"
    finally:
        torch.set_num_threads(before)
    assert _subnormals_survive()
    # Against the float64 reference: within 2x (gradients 3x) the error of plain float32 PyTorch
    # (the reference run in float32), the bound of docs/design.md section 5.
    def reference_run(dtype):
        xr = [t.to(dtype).requires_grad_() for t in (q, k, v, mu, omega, alpha)]
        S0r, z0r = (s.to(dtype).requires_grad_() for s in state)
        o, (Sr, zr) = reference.naive_gma(*xr, causal=True, initial_state=(S0r, z0r), output_final_state=True)
        return [o, Sr, zr] + list(_loss_grads(o, Sr, zr, xr + [S0r, z0r]))

    want, plain = reference_run(torch.float64), reference_run(torch.float32)
    for i, (a, b, c) in enumerate(zip([got, S, z] + list(got_grads), want, plain)):
        err, plain_err = ((t.double() - b).abs().max().item() for t in (a, c))
        floor = 1e-6 * b.abs().max().item()
        assert err <= (2 if i < 3 else 3) * plain_err + floor, (i, err, plain_err)


# ---------------------------------------------------------------------------------------------
# NumPy decoding with the state updated in place

def test_state_in_place_equals_new_state_arrays():
    """state_in_place=True writes each step's final state into the arrays it started from: the
    same outputs and states as new arrays per step, in the same (returned) arrays; row path
    (one token) and chunks (70 tokens) alike."""
    (q, k, v, mu, omega, alpha), state = _decode_inputs(80, dtype=torch.float32)
    arrays = [t.numpy() for t in (q, k, v, mu, omega, alpha)]
    for rows in ([slice(i, i + 1) for i in range(10)], [slice(10, 80)]):
        S, z = (s.numpy().copy() for s in state)
        fresh = (S.copy(), z.copy())
        for r in rows:
            x = [a[:, r] for a in arrays[:3]]
            out_new, fresh = gmattn.gma_attention(*x, *arrays[3:], causal=True, initial_state=fresh,
                                                  output_final_state=True)
            out_in, (S_ret, z_ret) = gmattn.gma_attention(*x, *arrays[3:], causal=True, initial_state=(S, z),
                                                          output_final_state=True, state_in_place=True)
            assert S_ret is S and z_ret is z
            np.testing.assert_array_equal(out_in, out_new)
            np.testing.assert_array_equal(S, fresh[0])
            np.testing.assert_array_equal(z, fresh[1])
        out_only = gmattn.gma_attention(*(a[:, :1] for a in arrays[:3]), *arrays[3:], causal=True,
                                        initial_state=(S, z), state_in_place=True)
        assert out_only.shape == (2, 1, 3, 4)


def test_state_in_place_is_never_silent():
    """state_in_place=True refuses what it could not update in place, naming the problem: no
    initial state, arrays of another dtype (a converted copy would be updated), read-only or
    non-contiguous arrays, and torch tensors."""
    (q, k, v, mu, omega, alpha), state = _decode_inputs(1, dtype=torch.float32)
    arrays = [t.numpy() for t in (q, k, v, mu, omega, alpha)]
    S, z = (s.numpy().copy() for s in state)
    with pytest.raises(ValueError, match="needs an initial_state"):
        gmattn.gma_attention(*arrays, causal=True, state_in_place=True)
    with pytest.raises(ValueError, match="accumulator dtype"):
        gmattn.gma_attention(*arrays, causal=True, initial_state=(S.astype(np.float64), z), state_in_place=True)
    frozen = S.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        gmattn.gma_attention(*arrays, causal=True, initial_state=(frozen, z), state_in_place=True)
    wide = np.zeros(S.shape[:-1] + (2 * S.shape[-1],), np.float32)[..., ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        gmattn.gma_attention(*arrays, causal=True, initial_state=(wide, z), state_in_place=True)
    with pytest.raises(ValueError, match="NumPy arrays"):
        gmattn.gma_attention(q, k, v, mu, omega, alpha, causal=True, initial_state=state, state_in_place=True)
    core = _ext.core()
    out = np.empty(arrays[2].shape, np.float32)
    with pytest.raises(ValueError, match="give no S_final"):
        core.forward(*arrays, None, S, z, out, S.copy(), z.copy(), None, None, None, True, 1e-6, 1e-4, 1, 0, None,
                     None, True)


# ---------------------------------------------------------------------------------------------
# The CPU module's plain entry (`step`) and the NumPy front end's route through it

def _step_arrays(B=2, N=1, H=3, K=6, D=5, Dv=4, dtype=np.float32, seed=3):
    (q, k, v, mu, omega, alpha), (S, z) = _decode_inputs(N, B=B, H=H, K=K, D=D, Dv=Dv, seed=seed)
    acc = np.float64 if dtype == np.float64 else np.float32
    return ([t.numpy().astype(dtype) for t in (q, k, v)] + [t.numpy().astype(acc) for t in (mu, omega, alpha)],
            (S.numpy().astype(acc), z.numpy().astype(acc)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("N", [1, ROW_PATH_ROWS + 3])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_step_entry_equals_forward(dtype, N, causal):
    """core.step gives forward's results bit for bit: new state arrays, the state in place, no
    initial state (with and without the final state), the row path and chunks; and both equal
    the float64 reference."""
    core = _ext.core()
    arrays, (S, z) = _step_arrays(N=N, dtype=dtype)
    B, _, H, Dv = arrays[2].shape
    K = arrays[3].shape[1]
    acc = arrays[3].dtype
    nan = lambda shape, dt: np.full(shape, np.nan, dt)  # noqa: E731  (unwritten elements show)
    tol = TOL64 if dtype == np.float64 else dict(rtol=2e-3, atol=2e-3) if dtype == np.float16 else dict(rtol=2e-5,
                                                                                                        atol=2e-6)
    for state in (True, False):
        S0, z0 = (S, z) if state else (None, None)
        want = [nan(arrays[2].shape, dtype), nan(S.shape, acc), nan(z.shape, acc)]
        core.forward(*arrays, None, S0, z0, *want, None, None, None, causal, 1e-6, 1e-4, 0, 0, None, None, False)
        got = [nan(arrays[2].shape, dtype), nan(S.shape, acc), nan(z.shape, acc)]
        assert core.step(*arrays, S0, z0, *got, causal, 1e-6, 1e-4, 0) is True
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        out_only = nan(arrays[2].shape, dtype)
        assert core.step(*arrays, S0, z0, out_only, None, None, causal, 1e-6, 1e-4, 0) is True
        np.testing.assert_array_equal(out_only, want[0])
        ref_out, (ref_S, ref_z) = reference.naive_gma(
            *(torch.from_numpy(a).double() for a in arrays), causal=causal,
            initial_state=tuple(torch.from_numpy(s).double() for s in (S0, z0)) if state else None,
            output_final_state=True)
        for a, b in zip(got, (ref_out, ref_S, ref_z)):
            torch.testing.assert_close(torch.from_numpy(a).double(), b, **tol)
    S_in, z_in = S.copy(), z.copy()
    out = nan(arrays[2].shape, dtype)
    assert core.step(*arrays, S_in, z_in, out, S_in, z_in, causal, 1e-6, 1e-4, 0) is True
    want = [nan(arrays[2].shape, dtype), nan(S.shape, acc), nan(z.shape, acc)]
    core.forward(*arrays, None, S, z, *want, None, None, None, causal, 1e-6, 1e-4, 0, 0, None, None, False)
    for a, b in zip((out, S_in, z_in), want):
        np.testing.assert_array_equal(a, b)


def test_step_entry_runs_nothing_for_what_forward_refuses():
    """core.step returns False, and writes nothing, for every argument forward would refuse and
    for arguments outside its pattern (not an array with the buffer protocol, another format);
    forward then names the problem."""
    core = _ext.core()
    arrays, (S, z) = _step_arrays()
    q, k, v, mu, omega, alpha = arrays
    out = np.empty(v.shape, np.float32)
    frozen = np.empty(v.shape, np.float32)
    frozen.flags.writeable = False
    gapped = np.empty(v.shape[:-1] + (2 * v.shape[-1],), np.float32)[..., ::2]
    cases = {
        "k shape": ((q, k[:, :, :2], v, mu, omega, alpha, S, z, out, None, None), "'k' must have shape"),
        "mu dtype": ((q, k, v, mu.astype(np.float64), omega, alpha, S, z, out, None, None), "'mu' must be float32"),
        "q ints": ((q.astype(np.int32), k, v, mu, omega, alpha, S, z, out, None, None), "'q' must be a floating"),
        "q big-endian": ((q.astype(">f4"), k, v, mu, omega, alpha, S, z, out, None, None), None),
        "S dtype": ((q, k, v, mu, omega, alpha, S.astype(np.float64), z, out, None, None), "must be float32"),
        "z missing": ((q, k, v, mu, omega, alpha, S, None, out, None, None), "both S and z"),
        "read-only out": ((q, k, v, mu, omega, alpha, S, z, frozen, None, None), "read-only"),
        "gapped out": ((q, k, v, mu, omega, alpha, S, z, gapped, None, None), "C-contiguous"),
        "out is v": ((q, k, v, mu, omega, alpha, S, z, v, None, None), "shares memory"),
        "list": ((q.tolist(), k, v, mu, omega, alpha, S, z, out, None, None), None),
        "S_final alone": ((q, k, v, mu, omega, alpha, S, z, out, S.copy(), None), None),
        "in place, z new": ((q, k, v, mu, omega, alpha, S, z, out, S, z.copy()), "shares memory"),
        "strides of half elements": ((np.ndarray(q.shape, np.float32, bytearray(q.nbytes * 2), 0,
                                                 (q.strides[0], q.strides[1], q.strides[2], 2)), k, v, mu, omega,
                                      alpha, S, z, out, None, None), None),
    }
    for name, (args, message) in cases.items():
        out.fill(np.nan)
        before = [np.array(a, copy=True) for a in args if isinstance(a, np.ndarray)]
        assert core.step(*args, True, 1e-6, 1e-4, 0) is False, name
        after = [a for a in args if isinstance(a, np.ndarray)]
        for x, y in zip(before, after):
            np.testing.assert_array_equal(x, y, err_msg=name)  # nothing written (NaN == NaN here)
        if message is not None:
            with pytest.raises(ValueError, match=message):
                core.forward(*args[:6], None, *args[6:], None, None, None, True, 1e-6, 1e-4, 0, 0, None, None, False)
    for eps, sigma_eps, threads in ((1e300, 1e-4, 0), (1e-6, float("nan"), 0), (1e-6, 1e-4, -1)):
        assert core.step(*arrays, S, z, out, None, None, True, eps, sigma_eps, threads) is False
    # An input at an odd address (whole-element strides) is served, as forward serves it: from an
    # aligned copy.
    odd = np.ndarray(q.shape, np.float32, bytearray(q.nbytes + 1), 1)
    odd[...] = q
    assert odd.ctypes.data % 4 != 0
    got, want = np.empty_like(out), np.empty_like(out)
    assert core.step(odd, k, v, mu, omega, alpha, S, z, got, None, None, True, 1e-6, 1e-4, 0) is True
    core.forward(q, k, v, mu, omega, alpha, None, S, z, want, None, None, None, None, None, True, 1e-6, 1e-4, 0, 0,
                 None, None, False)
    np.testing.assert_array_equal(got, want)


def test_step_entry_takes_dlpack_capsules():
    """The torch front end's route: core.step takes torch's DLPack capsules (torch tensors have no
    buffer protocol) and gives forward's results."""
    p = make_problem(1, 1, 2, 3, 4, 4, state=True, dtype=torch.float32)
    args = [t.detach() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)]
    S0, z0 = (s.detach() for s in p.state)
    outs = [torch.full_like(t, float("nan")) for t in (args[2], S0, z0)]
    capsules = [torch._C._to_dlpack(t) for t in (*args, S0, z0, *outs)]
    assert _ext.core().step(*capsules, True, 1e-6, 1e-4, 0) is True
    with torch.no_grad():
        want_out, (want_S, want_z) = gmattn.gma_attention(*args, causal=True, initial_state=(S0, z0),
                                                          output_final_state=True)
    for a, b in zip(outs, (want_out, want_S, want_z)):
        assert torch.equal(a, b)
    # It opens the capsules without consuming them: forward takes the same ones afterwards (the
    # route back when step returns False).
    for t in outs:
        t.fill_(float("nan"))
    _ext.core().forward(*capsules[:6], None, *capsules[6:], None, None, None, True, 1e-6, 1e-4, 0, 0, None, None,
                        False)
    for a, b in zip(outs, (want_out, want_S, want_z)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_torch_training_route_skips_the_python_checks_and_keeps_their_messages(causal, monkeypatch):
    """A plain eager CPU call with gradients (no mask, no packed sequences) goes to the direct
    autograd route without the Python checks: outputs, states and every gradient bit for bit the
    general path's (and the custom op's, test_direct_autograd_route_equals_the_custom_op); what it
    does not serve (a key in another dtype, a state of the wrong shape) goes the general path,
    whose checks name the problem as before."""
    p = make_problem(2, 37, 3, 5, 4, 6, state=True, dtype=torch.float64, seed=7)
    args, kwargs = (p.q, p.k, p.v, p.mu, p.omega, p.alpha), dict(causal=causal, initial_state=p.state,
                                                                 output_final_state=True)
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(2, 37, 3, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, 6, generator=g,
             dtype=torch.float64), torch.randn(2, 3, 5, generator=g, dtype=torch.float64)]
    with monkeypatch.context() as m:
        def refuse(*a, **kw):
            raise AssertionError("the Python checks ran")
        m.setattr(_checks, "check_arguments", refuse)
        fast = _value_and_grads(args, kwargs, grads)
    with monkeypatch.context() as m:
        m.setattr(ops, "_plain_call", lambda *a: None)  # the general path alone
        general = _value_and_grads(args, kwargs, grads)
    for a, b in zip(fast, general):
        assert torch.equal(a, b)
    q, k, v, mu, omega, alpha = (t.detach().requires_grad_() for t in args)
    S, z = (s.detach() for s in p.state)
    wrong = [  # (arguments, keywords, what the general path's message says)
        ((q, k.float(), v, mu, omega, alpha), {}, "'k' must have the dtype of q"),
        ((q, k, v, mu, omega, alpha), dict(initial_state=(S[:, :, :2], z)), r"initial_state\[0\] \(S\)"),
        ((q, k, v, mu, omega, alpha), dict(initial_state=(S, z[:, :1])), r"initial_state\[1\] \(z\)"),
    ]
    for arguments, keywords, message in wrong:
        with pytest.raises((ValueError, TypeError), match=message):
            gmattn.gma_attention(*arguments, causal=causal, **keywords)


def test_numpy_step_skips_the_python_checks_and_keeps_their_messages(monkeypatch):
    """A plain NumPy call (no mask, no packed sequences) goes through core.step without the Python
    checks, with the general path's results bit for bit; anything it does not serve goes the
    general path, whose checks name the problem as before."""
    from gmattn import numpy_ops

    arrays, (S, z) = _step_arrays(N=3)
    calls = [dict(causal=True, initial_state=(S, z), output_final_state=True),
             dict(causal=False, initial_state=[S, z]), dict(causal=True, output_final_state=True),
             dict(causal=True)]
    results = [gmattn.gma_attention(*arrays, **kw) for kw in calls]
    with monkeypatch.context() as m:
        m.setattr(numpy_ops, "_step_call", lambda *a: None)  # the general path alone
        general = [gmattn.gma_attention(*arrays, **kw) for kw in calls]
    with monkeypatch.context() as m:
        def refuse(*a, **kw):
            raise AssertionError("the Python checks ran")
        m.setattr(_checks, "check_arguments", refuse)
        again = [gmattn.gma_attention(*arrays, **kw) for kw in calls]
    flat = lambda r: [r] if isinstance(r, np.ndarray) else [x for y in r for x in flat(y)]  # noqa: E731
    for a, b, c in zip(results, general, again):
        for x, y, w in zip(flat(a), flat(b), flat(c)):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, w)
    # A causal that is not a bool (np.True_) takes the general path (which takes its truth value).
    full, seen = _checks.check_arguments, []
    with monkeypatch.context() as m:
        m.setattr(_checks, "check_arguments", lambda *a: seen.append(1) or full(*a))
        general_route = gmattn.gma_attention(*arrays, causal=np.True_, initial_state=(S, z))
    assert seen
    np.testing.assert_array_equal(general_route, gmattn.gma_attention(*arrays, causal=True, initial_state=(S, z)))
    q, k, v, mu, omega, alpha = arrays
    wrong = [  # (arguments, keywords, what the general path's message says)
        ((q, k[:, :2], v, mu, omega, alpha), {}, "'k' must have shape"),
        ((q, k, v, mu, omega, alpha[:, :2]), {}, "'alpha' has K=2"),
        ((q, k, v, mu.astype(np.float64), omega, alpha), {}, "'omega' must have the dtype of mu"),
        ((q, k, v, mu, omega, alpha), dict(eps=-1.0), "'eps' must be >= 0"),
        ((q, k, v, mu, omega, alpha), dict(initial_state=(S[:1], z)), r"initial_state\[0\] \(S\)"),
        ((q, k, v, mu, omega, alpha), dict(initial_state=(S.astype(np.float64), z), state_in_place=True),
         "accumulator dtype"),
        ((q, k, v, mu, omega, alpha), dict(eps=1e300), "'eps' must be a non-negative number"),
    ]
    for args, kw, message in wrong:
        with pytest.raises((ValueError, TypeError), match=message):
            gmattn.gma_attention(*args, causal=True, **kw)
