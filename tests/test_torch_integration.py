"""The torch layers inside torch's program transforms: torch.compile with dynamic sequence lengths
(no graph breaks, one compilation for every length, forward and backward), torch.export with a
dynamic sequence length, autocast (CPU bfloat16) and activation checkpointing."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gmattn
from gmattn import reference
from gmattn.torch import GaussianMixtureAttention

D_MODEL, HEADS, K = 16, 2, 4
LENGTHS = (5, 9, 17, 33)  # > 1: torch specialises sizes 0 and 1, whatever is marked dynamic


def _layer(causal: bool, seed: int = 0) -> GaussianMixtureAttention:
    torch.manual_seed(seed)
    return GaussianMixtureAttention(D_MODEL, HEADS, K, causal=causal)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return gmattn.build_model("gma", d_model=D_MODEL, num_heads=HEADS, num_components=K, causal=True,
                              vocab_size=11, num_layers=2, max_len=64)


class CountingBackend:
    """A torch.compile backend (AOT autograd, graphs run as traced) counting what it compiles:
    Dynamo frames, forward graphs and backward graphs."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.counts = Counter()

        def compiler(kind):
            def compile_graph(gm, example_inputs):
                self.counts[kind] += 1
                return make_boxed_func(gm.forward)
            return compile_graph

        self._aot = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))

    def __call__(self, gm, example_inputs):
        compiled = self._aot(gm, example_inputs)
        # Counted once it succeeds: with dynamic=True Dynamo first traces the layer's float eps as a
        # symbol, and when AOT autograd finds it passed to the op as a plain float, restarts the
        # same frame with it specialised. That is one compilation, not one per length.
        self.counts["frames"] += 1
        return compiled


def _loss_and_grads(module, x, params):
    y = module(x)
    loss = (y * torch.linspace(-1, 1, y.shape[-1])).square().mean()
    return (y.detach(),) + torch.autograd.grad(loss, [x] + params)


def _run_lengths(compiled, eager, lengths, mark=False):
    """Runs compiled and eager forward and backward at each length and compares them."""
    params = list(eager.parameters())
    for n in lengths:
        x = torch.randn(2, n, D_MODEL, requires_grad=True)
        if mark:
            torch._dynamo.mark_dynamic(x, 1)
        got = _loss_and_grads(compiled, x, params)
        want = _loss_and_grads(eager, x, params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_compile_dynamic_no_graph_break_one_compilation(causal):
    torch._dynamo.reset()
    layer = _layer(causal)
    backend = CountingBackend()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=backend)  # fullgraph: a break raises
    _run_lengths(compiled, layer, LENGTHS)
    assert backend.counts == Counter(frames=1, forward=1, backward=1), backend.counts


def test_compile_mark_dynamic_sequence_axis_one_compilation():
    torch._dynamo.reset()
    layer = _layer(causal=True, seed=1)
    backend = CountingBackend()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    _run_lengths(compiled, layer, LENGTHS, mark=True)
    assert backend.counts == Counter(frames=1, forward=1, backward=1), backend.counts


def test_compile_dynamic_with_mask_and_state():
    """The optional arguments (mask, initial state, final state) through the dynamic graph."""
    torch._dynamo.reset()
    layer = _layer(causal=True, seed=2)
    backend = CountingBackend()

    def step(x, mask, S0, z0):
        y, (S, z) = layer(x, key_padding_mask=mask, state=(S0, z0), return_state=True)
        return y.square().mean() + S.mean() + z.mean()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=backend)
    for n in LENGTHS:
        x = torch.randn(3, n, D_MODEL, requires_grad=True)
        mask = torch.rand(3, n) > 0.3
        S0 = torch.rand(3, HEADS, K, D_MODEL // HEADS, requires_grad=True)
        z0 = (torch.rand(3, HEADS, K) + 0.1).requires_grad_()
        inputs = [x, S0, z0] + list(layer.parameters())
        got = torch.autograd.grad(compiled(x, mask, S0, z0), inputs)
        want = torch.autograd.grad(step(x, mask, S0, z0), inputs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert backend.counts == Counter(frames=1, forward=1, backward=1), backend.counts


def test_compile_dynamic_inductor_sequence_model():
    """The default backend (Inductor) over a whole SequenceModel, lengths varying, one compilation."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model(seed=3)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    params = list(model.parameters())
    for n in (7, 20):
        tokens = torch.randint(0, 11, (2, n))
        got = compiled(tokens)
        want = model(tokens)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for g, w in zip(torch.autograd.grad(got.square().mean(), params),
                        torch.autograd.grad(want.square().mean(), params)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# --------------------------------------------------------------------------------------------
# torch.export with a dynamic sequence length

def _export(module, args, dynamic_shapes):
    from torch.export import export

    return export(module, args, dynamic_shapes=dynamic_shapes)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_export_layer_dynamic_length(causal):
    from torch.export import Dim

    layer = _layer(causal, seed=4)
    B, N = Dim("B"), Dim("N")  # unbounded: the size checks must not cap them
    mask = torch.ones(2, 9, dtype=torch.bool)
    program = _export(layer, (torch.randn(2, 9, D_MODEL), mask), ({0: B, 1: N}, {0: B, 1: N}))
    for b, n in ((2, 3), (2, 9), (3, 40)):
        x = torch.randn(b, n, D_MODEL)
        mask = torch.rand(b, n) > 0.25
        torch.testing.assert_close(program.module()(x, mask), layer(x, mask), rtol=1e-5, atol=1e-6)


def test_export_sequence_model_dynamic_length():
    from torch.export import Dim

    model = _model(seed=5).eval()
    N = Dim("N", min=2, max=64)  # the learned positions go up to max_len = 64
    program = _export(model, (torch.randint(0, 11, (2, 10)),), ({1: N},))
    for n in (2, 10, 37, 64):
        tokens = torch.randint(0, 11, (2, n))
        torch.testing.assert_close(program.module()(tokens), model(tokens), rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="<= 64"):
        program.module()(torch.randint(0, 11, (2, 65)))  # outside the exported range: refused


@pytest.mark.parametrize("kind", ["gma", "softmax", "linear", "performer"])
def test_export_classifier_with_mask_dynamic_length(kind):
    """Every mixer kind's masked SequenceModel exports with an unbounded dynamic length."""
    from torch.export import Dim

    torch.manual_seed(8)
    model = gmattn.build_model(kind, d_model=D_MODEL, num_heads=HEADS, num_components=K, vocab_size=11,
                               num_layers=1, head="classification", num_classes=3).eval()
    N = Dim("N")
    program = _export(model, (torch.randint(0, 11, (2, 10)), torch.ones(2, 10, dtype=torch.bool)), ({1: N}, {1: N}))
    for n in (4, 31):
        tokens, mask = torch.randint(0, 11, (2, n)), torch.rand(2, n) > 0.3
        mask[:, 0] = True
        torch.testing.assert_close(program.module()(tokens, mask), model(tokens, mask), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Autocast and checkpointing

def _max_error(got, want):
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_autocast_cpu_bfloat16(causal, monkeypatch):
    """Under CPU bf16 autocast the projections run in bf16 and the op takes bf16 q, k, v with the
    float32 mixture parameters. The output and every parameter gradient are no further from the
    float64 result than those of the same layer built on the plain PyTorch reference op under the
    same autocast (2x for outputs, 3x for gradients, the library's low-precision rule)."""
    layer = _layer(causal, seed=6)
    x = torch.randn(2, 48, D_MODEL)
    exact = copy.deepcopy(layer).double()
    y64 = exact(x.double())
    y64.square().sum().backward()
    exact_grads = [p.grad for p in exact.parameters()]

    def autocast_run(module):
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in module.parameters())
        return y, [p.grad for p in module.parameters()]

    y, grads = autocast_run(layer)
    plain = copy.deepcopy(layer)

    def plain_op(*args, cu_seqlens=None, **kwargs):  # the layer passes cu_seqlens (None: not packed)
        assert cu_seqlens is None
        return reference.chunked_gma(*args, **kwargs)

    monkeypatch.setattr("gmattn.torch.layers.gma_attention", plain_op)
    y_plain, grads_plain = autocast_run(plain)

    assert _max_error(y, y64) <= 2 * _max_error(y_plain, y64) + 1e-3
    for name, g, g_plain, g64 in zip([n for n, _ in layer.named_parameters()], grads, grads_plain, exact_grads):
        assert _max_error(g, g64) <= 3 * _max_error(g_plain, g64) + 1e-3 * g64.abs().max().item(), name


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_checkpoint_gradients_equal_plain(causal, use_reentrant):
    """Recomputing the layer in the backward (activation checkpointing) gives the gradients of the
    plain run, bit for bit (the backward is deterministic)."""
    layer = _layer(causal, seed=7)
    x = torch.randn(2, 30, D_MODEL, requires_grad=True)
    params = [x] + list(layer.parameters())

    def run(forward):
        for p in params:
            p.grad = None
        y = forward(x)
        y.square().sum().backward()  # reentrant checkpointing supports .backward(), not autograd.grad
        return y.detach(), [p.grad for p in params]

    y, plain = run(layer)
    y_ckpt, ckpt = run(lambda x: checkpoint(layer, x, use_reentrant=use_reentrant))
    assert torch.equal(y_ckpt, y)
    for a, b in zip(ckpt, plain):
        assert torch.equal(a, b)
