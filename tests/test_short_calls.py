"""Short calls and the one-token decoding step: the routes that cut their fixed cost give the
float64 reference's results (outputs, states, gradients).

- torch without gradients on CPU calls the core directly, not through the custom op: the same
  numbers bit for bit, and the op still serves autograd and tracing;
- the core keeps prepared mixtures (variances, log-determinants, prior) for later calls with the
  same parameter values: a change of the parameters, in place or not, is never served stale;
- a call with very little work runs on one thread, with any thread count asked for;
- the torch front end hands the CPU module DLPack capsules; the module takes only unused ones;
- the argument checks accept a plainly valid call quickly and agree with the full checks.
"""

from __future__ import annotations

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
    assert calls, "the custom op did not run for a call that needs gradients"


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
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x = p.detached()
            out, (S, z) = gmattn.gma_attention(x.q, x.k, x.v, x.mu, x.omega, x.alpha, causal=causal,
                                               key_padding_mask=x.mask, initial_state=x.state, output_final_state=True)
            for got, want in ((out, ref_out), (S, ref_state[0]), (z, ref_state[1])):
                torch.testing.assert_close(got.detach(), want.detach(), **TOL64)
            loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + S.sum() - z.sum()
            results.append([out.detach()] + list(torch.autograd.grad(loss, x.tensors())))
    finally:
        torch.set_num_threads(before)
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
