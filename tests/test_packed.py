"""Packed variable-length sequences (cu_seqlens): S sequences one after another in one row of
B = 1, each attended on its own. Every front end against gmattn.reference.packed_gma (naive_gma
on each sequence, float64): outputs, final states and every gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gmattn
from gmattn import reference
from gmattn.torch.ops import backward_op, forward_op

from conftest import LOW_PRECISION_STATE_FLOOR, plain_mixed_precision

TOL64 = dict(rtol=1e-9, atol=1e-11)
OUT_NAMES = ("out", "S_final", "z_final")
GRAD_NAMES = ("dq", "dk", "dv", "dmu", "domega", "dalpha", "dS0", "dz0")


def offsets_of(lengths):
    return torch.tensor(np.cumsum([0] + list(lengths)), dtype=torch.int64)


def make_packed(lengths, H=2, K=5, D=4, Dv=6, *, state=True, dtype=torch.float64, seed=0):
    """q, k, v (1, N, H, .) for sequences of `lengths`, parameters, an (S, H, ...) initial state."""
    g = torch.Generator().manual_seed(seed)
    N, S = int(sum(lengths)), len(lengths)

    def rand(*shape, s=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s + shift).to(dtype).requires_grad_()

    tensors = [rand(1, N, H, D), rand(1, N, H, D), rand(1, N, H, Dv), rand(H, K, D), rand(H, K, D, s=0.5),
               rand(H, K, s=0.5)]
    if state:
        tensors += [rand(S, H, K, Dv).abs().detach().requires_grad_(),
                    rand(S, H, K, shift=0.1).abs().detach().requires_grad_()]
    return tensors


def run(fn, tensors, offsets, causal, seed=1, **kw):
    """(out, S_final, z_final) and the gradients of every input for fixed random cotangents."""
    q, k, v, mu, omega, alpha, *state = tensors
    out, (S, z) = fn(q, k, v, mu, omega, alpha, causal=causal, initial_state=tuple(state) or None,
                     output_final_state=True, cu_seqlens=offsets, **kw)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype) for t in (out, S, z)]
    grads = torch.autograd.grad((out, S, z), tensors, cot)
    return [out, S, z], list(grads)


def packed_reference(q, k, v, mu, omega, alpha, *, cu_seqlens, **kw):
    return reference.packed_gma(q, k, v, mu, omega, alpha, cu_seqlens, **kw)


def assert_all_close(got, want, names, **tol):
    for a, b, name in zip(got, want, names):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        torch.testing.assert_close(a.double(), b.double(), msg=lambda m: f"{name}: {m}", **tol)


# Lengths with empty sequences, single tokens, a sequence of exactly one chunk (64 rows), and
# sequences of several chunks with a short last one.
LENGTHS = {
    "mixed": [1, 0, 70, 5, 130, 64, 0, 2],
    "one": [97],
    "short": [3, 1, 2, 16, 1, 7, 5, 9, 1, 4, 11],
    "empty_ends": [0, 40, 0],
}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("state", [True, False], ids=["state", "nostate"])
def test_packed_matches_loop_over_sequences(causal, lengths, threads, state):
    """Outputs, final states and every gradient (q, k, v, mu, omega, alpha, S0, z0) equal naive_gma
    run on each sequence alone, to float64 rounding, for every work plan: one task per sequence,
    segments of sequences (bidirectional) and relays (causal) when sequences x heads are too few
    for the threads."""
    H = 1 if lengths == "one" else 2
    tensors = make_packed(LENGTHS[lengths], H=H, state=state)
    offsets = offsets_of(LENGTHS[lengths])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs, grads = run(gmattn.gma_attention, tensors, offsets, causal)
    finally:
        torch.set_num_threads(previous)
    want_outs, want_grads = run(packed_reference, tensors, offsets, causal)
    assert_all_close(outs, want_outs, OUT_NAMES, **TOL64)
    assert_all_close(grads, want_grads, GRAD_NAMES, **TOL64)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_packed_equals_separate_calls(causal):
    """The packed call and gma_attention on each sequence as its own batch row of B = 1 agree to
    float64 rounding (the same kernels, a different work plan)."""
    lengths = [33, 1, 200, 64, 65]
    tensors = make_packed(lengths, H=3)
    offsets = offsets_of(lengths)
    outs, grads = run(gmattn.gma_attention, tensors, offsets, causal)

    def separate(q, k, v, mu, omega, alpha, *, cu_seqlens, initial_state, **kw):
        results = [gmattn.gma_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mu, omega, alpha,
                                        initial_state=(initial_state[0][s:s + 1], initial_state[1][s:s + 1]), **kw)
                   for s, (lo, hi) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))]
        return (torch.cat([r[0] for r in results], 1),
                (torch.cat([r[1][0] for r in results]), torch.cat([r[1][1] for r in results])))

    want_outs, want_grads = run(separate, tensors, offsets, causal)
    assert_all_close(outs, want_outs, OUT_NAMES, **TOL64)
    assert_all_close(grads, want_grads, GRAD_NAMES, **TOL64)


# Many short sequences of mixed lengths, several to a chunk of the CPU core (64 rows): lengths
# 1, 2, 15, 16, 17, 63, 64, 65 and longer, empty ones, sequences that fill a chunk exactly, and runs
# whose packing leaves a chunk short.
PACKED_CHUNKS = {
    "short_mix": [1, 2, 15, 16, 17, 63, 64, 65, 0, 3, 16, 16, 16, 16, 40, 24, 1, 7, 2, 33, 31, 0, 9, 130, 5, 60,
                  4, 1, 1, 12],
    # Mean above 64 tokens: the bidirectional backward reuses the forward's final state (the
    # long sequences read it; the packed chunks need none).
    "long_mean": [300, 5, 7, 1, 200, 16, 17, 64, 0, 2],
    "all_16": [16] * 40,
    # At most 4 tokens each, more than a chunk in all: packed chunks rather than the row path.
    "tiny": [2, 3, 4, 1, 0, 4, 3, 2, 1, 1, 4, 4, 2, 3] * 3,
}


def run_variant(fn, tensors, offsets, causal, final, seed=1):
    """run() with or without the final state (without: no final-state cotangents either)."""
    if final:
        return run(fn, tensors, offsets, causal, seed)
    q, k, v, mu, omega, alpha, *state = tensors
    out = fn(q, k, v, mu, omega, alpha, causal=causal, initial_state=tuple(state) or None, cu_seqlens=offsets)
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return [out], list(torch.autograd.grad(out, tensors, cot))


def loop_over_sequences(q, k, v, mu, omega, alpha, *, cu_seqlens, initial_state=None, output_final_state=False,
                        **kw):
    """gma_attention on each sequence alone (a batch row of B = 1), results concatenated."""
    outs, states = [], []
    for s, (lo, hi) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        state = None if initial_state is None else (initial_state[0][s:s + 1], initial_state[1][s:s + 1])
        if hi == lo:
            outs.append(v[:, lo:hi] * 0)
            states.append(state or tuple(torch.zeros(1, *shape, dtype=mu.dtype) for shape in
                                         ((q.shape[2], mu.shape[1], v.shape[3]), (q.shape[2], mu.shape[1]))))
            continue
        out, fs = gmattn.gma_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mu, omega, alpha, initial_state=state,
                                       output_final_state=True, **kw)
        outs.append(out)
        states.append(fs)
    out = torch.cat(outs, 1)
    if not output_final_state:
        return out
    return out, (torch.cat([s[0] for s in states]), torch.cat([s[1] for s in states]))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("lengths", list(PACKED_CHUNKS), ids=list(PACKED_CHUNKS))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("state", ["state", "nostate", "state_nofinal", "nostate_nofinal"])
def test_packed_chunks_match_loop_over_sequences(causal, lengths, threads, state):
    """Short sequences packed several to a chunk (each a block reading only its own rows, its own
    initial state, and giving its own final state and state gradients): outputs, final states and
    every gradient equal naive_gma on each sequence alone to float64 rounding, with and without
    an initial state and a final state."""
    lens = PACKED_CHUNKS[lengths]
    tensors = make_packed(lens, H=2, K=5, D=4, Dv=6, state=state.startswith("state"), seed=7)
    offsets = offsets_of(lens)
    final = not state.endswith("nofinal")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs, grads = run_variant(gmattn.gma_attention, tensors, offsets, causal, final)
    finally:
        torch.set_num_threads(previous)
    want_outs, want_grads = run_variant(packed_reference, tensors, offsets, causal, final)
    assert_all_close(outs, want_outs, OUT_NAMES, **TOL64)
    assert_all_close(grads, want_grads, GRAD_NAMES, **TOL64)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_chunks_float32_as_accurate_as_a_loop(causal, threads):
    """float32, a realistic size (K = 16, D = Dv = 32, chunks of 64 rows): the packed call's error
    against float64 is within 2x (3x for gradients) that of a float32 loop of separate calls over
    the sequences, which run every sequence in chunks of its own."""
    lens = PACKED_CHUNKS["short_mix"] * 3
    base = make_packed(lens, H=2, K=16, D=32, Dv=32, seed=11)
    offsets = offsets_of(lens)

    def as_(dtype):
        return [t.detach().to(dtype).requires_grad_() for t in base]

    want_outs, want_grads = run(packed_reference, as_(torch.float64), offsets, causal)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs, grads = run(gmattn.gma_attention, as_(torch.float32), offsets, causal)
        loop_outs, loop_grads = run(loop_over_sequences, as_(torch.float32), offsets, causal)
    finally:
        torch.set_num_threads(previous)
    for got, loop, want, name, factor in zip(outs + grads, loop_outs + loop_grads, want_outs + want_grads,
                                             OUT_NAMES + GRAD_NAMES, [2] * 3 + [3] * 8):
        scale = want.abs().max().item()
        ours = (got.double() - want).abs().max().item() / scale
        theirs = (loop.double() - want).abs().max().item() / scale
        assert ours <= factor * theirs + 1e-7, f"{name}: error {ours:.2e} vs a loop of calls {theirs:.2e}"


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def _on_cuda(tensors):
    return [t.detach().cuda().requires_grad_() for t in tensors]


@needs_gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
def test_packed_on_cuda_matches_loop_over_sequences(causal, lengths):
    """The CUDA kernels on packed sequences (offsets on the GPU): outputs, final states and every
    gradient equal naive_gma on each sequence alone, to float64 rounding."""
    tensors = make_packed(LENGTHS[lengths], H=2)
    offsets = offsets_of(LENGTHS[lengths])
    outs, grads = run(gmattn.gma_attention, _on_cuda(tensors), offsets.cuda(), causal)
    want_outs, want_grads = run(packed_reference, tensors, offsets, causal)
    assert_all_close([t.cpu() for t in outs], want_outs, OUT_NAMES, **TOL64)
    assert_all_close([t.cpu() for t in grads], want_grads, GRAD_NAMES, **TOL64)


@needs_gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_packed_on_cuda_long_and_short_float32(causal):
    """float32 on the GPU: one sequence over many segments among many short ones (states through
    the segment scan and streamed), against the float64 reference."""
    lengths = [5000] + (np.arange(500) % 13).tolist() + [777]
    tensors = make_packed(lengths, H=4, K=8, D=16, Dv=32, dtype=torch.float32)
    offsets = offsets_of(lengths)
    outs, grads = run(gmattn.gma_attention, _on_cuda(tensors), offsets.cuda(), causal)
    want_outs, want_grads = run(packed_reference, [t.double().detach().requires_grad_() for t in tensors], offsets,
                                causal)
    for got, want, name in zip(outs + grads, want_outs + want_grads, OUT_NAMES + GRAD_NAMES):
        scale = want.abs().max().item()
        err = (got.detach().cpu().double() - want).abs().max().item() / scale
        assert err < 3e-4, f"{name}: {err:.2e}"


def test_many_short_sequences():
    """A row of 300 sequences of 1 to 5 tokens (the tasks of the work plan are the sequences)."""
    lengths = (np.arange(300) % 5 + 1).tolist()
    tensors = make_packed(lengths, H=2, K=3, D=3, Dv=2)
    offsets = offsets_of(lengths)
    for causal in (False, True):
        outs, grads = run(gmattn.gma_attention, tensors, offsets, causal)
        want_outs, want_grads = run(packed_reference, tensors, offsets, causal)
        assert_all_close(outs, want_outs, OUT_NAMES, **TOL64)
        assert_all_close(grads, want_grads, GRAD_NAMES, **TOL64)


def test_empty_sequence_passes_its_state_through():
    lengths = [5, 0, 3]
    q, k, v, mu, omega, alpha, S0, z0 = make_packed(lengths)
    (_, S, z), (*_, dS0, dz0) = run(gmattn.gma_attention, [q, k, v, mu, omega, alpha, S0, z0], offsets_of(lengths),
                                    True)
    assert torch.equal(S[1], S0[1].detach()) and torch.equal(z[1], z0[1].detach())
    g = torch.Generator().manual_seed(1)  # run()'s cotangents: the empty sequence's dS0 is its dS_final
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (torch.empty(1, 8, 2, 6), S, z)]
    assert torch.equal(dS0[1], cot[1][1]) and torch.equal(dz0[1], cot[2][1])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_packed_gradcheck(causal):
    lengths = [3, 0, 1, 4]
    tensors = make_packed(lengths, H=1, K=2, D=2, Dv=2)
    offsets = offsets_of(lengths)

    def fn(*t):
        out, (S, z) = gmattn.gma_attention(*t[:6], causal=causal, initial_state=t[6:], output_final_state=True,
                                           cu_seqlens=offsets)
        return out, S, z

    assert torch.autograd.gradcheck(fn, tuple(tensors), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_low_precision_within_pytorch_error(dtype, causal):
    """16-bit q, k, v with float32 parameters and state: every output and gradient within 2x (3x
    for gradients) of plain PyTorch's error on the same inputs, both against float64 (the bound of
    tests/test_core.py for unpacked inputs)."""
    lengths = [40, 1, 0, 90, 17]
    base = make_packed(lengths, H=2, K=8, D=8, Dv=8, seed=4)
    offsets = offsets_of(lengths)

    def mixed():
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in base[:3])
        return [q, k, v] + [t.detach().float().requires_grad_() for t in base[3:]]

    ref_outs, ref_grads = run(packed_reference, [t.detach().double().requires_grad_() for t in mixed()], offsets,
                              causal)
    torch_outs, torch_grads = run(plain_mixed_precision(packed_reference), mixed(), offsets, causal)
    outs, grads = run(gmattn.gma_attention, mixed(), offsets, causal)
    for a, t, r, name, factor in zip(outs + grads, torch_outs + torch_grads, ref_outs + ref_grads,
                                     OUT_NAMES + GRAD_NAMES, [2] * 3 + [3] * 8):
        ours = (a.double() - r).abs().max().item()
        theirs = (t.double() - r).abs().max().item()
        floor = LOW_PRECISION_STATE_FLOOR * r.abs().max().item() if name in ("S_final", "z_final") else 0.0
        assert ours <= factor * theirs + floor, f"{name}: error {ours:.3e} vs plain PyTorch {theirs:.3e}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_torch_compile_fullgraph(causal):
    """The packed op under torch.compile(fullgraph=True): no graph break, the eager results and
    gradients, and a second offsets array of another length reuses the graph's shapes symbolically."""
    lengths = [7, 0, 30, 1]
    tensors = make_packed(lengths)
    offsets = offsets_of(lengths)

    def fn(q, k, v, mu, omega, alpha, *, cu_seqlens, **kw):
        return gmattn.gma_attention(q, k, v, mu, omega, alpha, cu_seqlens=cu_seqlens, **kw)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    outs, grads = run(compiled, tensors, offsets, causal)
    want_outs, want_grads = run(gmattn.gma_attention, tensors, offsets, causal)
    assert_all_close(outs, want_outs, OUT_NAMES, rtol=0, atol=0)
    assert_all_close(grads, want_grads, GRAD_NAMES, rtol=0, atol=0)


def test_opcheck_with_offsets():
    lengths = [4, 0, 9]
    q, k, v, mu, omega, alpha, S0, z0 = (t.detach() for t in make_packed(lengths, H=2, K=3, D=2, Dv=3))
    offsets = offsets_of(lengths)
    for causal in (False, True):
        args = (q, k, v, mu, omega, alpha, None, S0, z0, causal, 1e-6, 1e-4, True, True, offsets)
        torch.library.opcheck(forward_op, args)
        out, S, z, gq, gk, den = forward_op(*args)
        torch.library.opcheck(backward_op, (torch.randn_like(out), torch.randn_like(S), torch.randn_like(z), q, k, v,
                                            mu, omega, alpha, None, S0, z0, out, gq, gk, den, None, None, causal,
                                            1e-6, 1e-4, offsets))


def test_int32_offsets_and_numpy_front_end():
    """int32 offsets work like int64; the NumPy front end gives the torch results."""
    lengths = [6, 0, 1, 70]
    tensors = [t.detach() for t in make_packed(lengths)]
    offsets = offsets_of(lengths)
    for causal in (False, True):
        want, (S_w, z_w) = gmattn.gma_attention(*tensors[:6], causal=causal, initial_state=tuple(tensors[6:]),
                                                output_final_state=True, cu_seqlens=offsets)
        got, (S_g, z_g) = gmattn.gma_attention(*tensors[:6], causal=causal, initial_state=tuple(tensors[6:]),
                                               output_final_state=True, cu_seqlens=offsets.int())
        assert torch.equal(got, want) and torch.equal(S_g, S_w) and torch.equal(z_g, z_w)
        arrays = [t.numpy() for t in tensors]
        got, (S_g, z_g) = gmattn.gma_attention(*arrays[:6], causal=causal, initial_state=tuple(arrays[6:]),
                                               output_final_state=True, cu_seqlens=offsets.numpy().astype(np.int32))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(S_g, S_w.numpy(), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(z_g, z_w.numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["core", "native"])
def test_mlx_front_end(backend):
    """MLX, both backends (float32): outputs, final state and every gradient against float64."""
    mx = pytest.importorskip("mlx.core")
    import gmattn.mlx  # noqa: F401

    lengths = [6, 0, 1, 70, 3]
    tensors = make_packed(lengths, seed=2)
    offsets = offsets_of(lengths)
    for causal in (False, True):
        want_outs, want_grads = run(packed_reference, tensors, offsets, causal)
        arrays = [mx.array(t.detach().float().numpy()) for t in tensors]
        g = torch.Generator().manual_seed(1)
        cot = [mx.array(torch.randn(t.shape, generator=g, dtype=torch.float64).float().numpy()) for t in want_outs]

        def loss(*a):
            out, (S, z) = gmattn.mlx.gma_attention(*a[:6], causal=causal, initial_state=tuple(a[6:]),
                                                   output_final_state=True, cu_seqlens=mx.array(offsets.numpy()),
                                                   backend=backend)
            return (out * cot[0]).sum() + (S * cot[1]).sum() + (z * cot[2]).sum(), (out, S, z)

        (_, outs), grads = mx.value_and_grad(loss, argnums=list(range(8)))(*arrays)
        for got, want, name in zip(list(outs) + list(grads), want_outs + want_grads, OUT_NAMES + GRAD_NAMES):
            np.testing.assert_allclose(np.array(got), want.detach().numpy(), rtol=2e-4, atol=2e-5, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Bad offsets: clear errors naming the argument
BAD_OFFSETS = [
    (lambda N: torch.tensor([[0, N]]), ValueError, "'cu_seqlens' must have 1 dimensions"),
    (lambda N: torch.tensor([0.0, N]), TypeError, "'cu_seqlens' must be an int32 or int64"),
    (lambda N: torch.tensor([0]), ValueError, "S \\+ 1 >= 2 offsets"),
    (lambda N: torch.tensor([1, N]), ValueError, "must start at 0, got 1"),
    (lambda N: torch.tensor([0, 5, N - 1]), ValueError, "must end at N = 20"),
    (lambda N: torch.tensor([0, 9, 4, N]), ValueError, "must not decrease, got 9 then 4"),
]


@pytest.mark.parametrize("case", range(len(BAD_OFFSETS)))
@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_bad_offsets_rejected(case, framework):
    make, error, message = BAD_OFFSETS[case]
    q, k, v, mu, omega, alpha = (t.detach() for t in make_packed([10, 10], state=False))
    offsets = make(20)
    args = [q, k, v, mu, omega, alpha]
    if framework == "numpy":
        args, offsets = [t.numpy() for t in args], offsets.numpy()
    with pytest.raises(error, match=message):
        gmattn.gma_attention(*args, cu_seqlens=offsets)


def test_offsets_need_one_row_no_mask_and_states_per_sequence():
    q, k, v, mu, omega, alpha = (t.detach() for t in make_packed([10, 10], state=False))
    offsets = offsets_of([10, 10])
    with pytest.raises(ValueError, match="B = 1, got B = 2"):
        gmattn.gma_attention(*(torch.cat([t, t]) for t in (q, k, v)), mu, omega, alpha, cu_seqlens=offsets)
    with pytest.raises(ValueError, match="'key_padding_mask' cannot be combined with 'cu_seqlens'"):
        gmattn.gma_attention(q, k, v, mu, omega, alpha, cu_seqlens=offsets,
                             key_padding_mask=torch.ones(1, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"initial_state\[0\] \(S\)' must have shape \(S, H, K, Dv\) = \(2, 2, 5, 6\)"):
        gmattn.gma_attention(q, k, v, mu, omega, alpha, cu_seqlens=offsets,
                             initial_state=(torch.zeros(1, 2, 5, 6, dtype=q.dtype), torch.zeros(1, 2, 5, dtype=q.dtype)))


def test_core_checks_offsets_itself():
    """The compiled module refuses bad offsets on its own (the front ends check shapes only)."""
    q, k, v, mu, omega, alpha = (t.detach() for t in make_packed([10, 10], state=False))
    out = torch.empty(1, 20, 2, 6, dtype=q.dtype)
    core = gmattn._ext.core()
    for offsets, message in ((torch.tensor([0, 3, 19]), "must end at N = 20"),
                             (torch.tensor([0, 30, 20]), "must not decrease"),
                             (torch.tensor([0, 20], dtype=torch.int32), "must be int64")):
        with pytest.raises(ValueError, match=message):
            core.forward(q, k, v, mu, omega, alpha, None, None, None, out, None, None, None, None, None,
                         causal=True, eps=1e-6, sigma_eps=1e-4, cu_seqlens=offsets)
