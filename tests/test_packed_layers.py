"""Packed sequences (cu_seqlens) through the layers, mixers, blocks and models, in torch and MLX.

A call on S sequences packed into one row must equal S separate calls: outputs, states (one row
per sequence) and, in torch (float64), the gradients of the inputs and of every parameter. MLX
cases skip when MLX is missing.
"""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gmattn.mixers import KINDS, build_block, build_mixer, build_model  # noqa: E402

HAS_MLX = importlib.util.find_spec("mlx") is not None
D_MODEL, HEADS, VOCAB = 16, 2, 13
LENGTHS = (5, 1, 17, 0, 9)          # an empty sequence and a one-token one among them
FIRST, SECOND = (3, 1, 10, 0, 4), (2, 0, 7, 0, 5)  # LENGTHS in two pieces, for the states
FRAMEWORKS = ["torch", "mlx"]


def offsets_of(lengths):
    return np.array([0, *itertools.accumulate(lengths)], dtype=np.int64)


def segments(lengths):
    offsets = offsets_of(lengths)
    return list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))


class Torch:
    name = "torch"
    tokens = np.int64

    @staticmethod
    def array(a):
        a = np.ascontiguousarray(a)
        return torch.from_numpy(a.astype(np.float64) if a.dtype == np.float32 else a)

    @staticmethod
    def numpy(t):
        return t.detach().cpu().numpy()

    @staticmethod
    def prepare(module):
        return module.double().eval()

    tol = dict(rtol=1e-10, atol=1e-12)


class MLX:
    name = "mlx"
    tokens = np.int32

    @staticmethod
    def array(a):
        import mlx.core as mx

        return mx.array(np.ascontiguousarray(a))

    @staticmethod
    def numpy(t):
        return np.array(t)

    @staticmethod
    def prepare(module):
        module.eval()
        return module

    tol = dict(rtol=2e-5, atol=2e-6)  # float32: MLX has no float64 on the GPU, nor do its mixers


def _framework(name):
    if name == "mlx" and not HAS_MLX:
        pytest.skip("MLX is not installed")
    return Torch if name == "torch" else MLX


def _seed(fw, seed):
    torch.manual_seed(seed)
    if fw.name == "mlx":
        import mlx.core as mx

        mx.random.seed(seed)


def _config(kind, causal, seed=0):
    return dict(d_model=D_MODEL, num_heads=HEADS, causal=causal, num_components=5, num_features=12, state_dim=8,
                seed=seed)


def _mixer(fw, kind, causal, seed=0):
    _seed(fw, seed)
    return fw.prepare(build_mixer(kind, framework=fw.name, **_config(kind, causal, seed)))


def _x(N, seed=0):
    return np.random.default_rng(seed).standard_normal((1, N, D_MODEL)).astype(np.float32)


def _state_rows(state, s):
    return [a[s: s + 1] for a in state]


# ----------------------------------------------------------------------------------------------
# Mixers (the GMA one is the layer): packed call == each sequence on its own
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fw_name", FRAMEWORKS)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_mixer_equals_separate_runs(kind, fw_name, causal):
    fw = _framework(fw_name)
    m = _mixer(fw, kind, causal)
    x = _x(sum(LENGTHS), seed=1)
    y = fw.numpy(m(fw.array(x), cu_seqlens=fw.array(offsets_of(LENGTHS))))
    assert y.shape == x.shape
    for lo, hi in segments(LENGTHS):
        if hi > lo:
            np.testing.assert_allclose(y[:, lo:hi], fw.numpy(m(fw.array(x[:, lo:hi]))), **fw.tol,
                                       err_msg=f"sequence [{lo}, {hi})")
    # Not vacuous: the same row unpacked mixes across the boundaries.
    assert np.abs(fw.numpy(m(fw.array(x))) - y).max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_mixer_gradients_equal_separate_runs(kind, causal):
    """torch, float64: the gradients of x and of every parameter of one packed call equal those of
    the separate calls (summed over the sequences)."""
    m = _mixer(Torch, kind, causal)
    x = Torch.array(_x(sum(LENGTHS), seed=2)).requires_grad_()
    cot = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = [p for p in m.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, [x, *params])

    packed = grads((m(x, cu_seqlens=torch.from_numpy(offsets_of(LENGTHS))) * cot).sum())
    separate = grads(sum((m(x[:, lo:hi]) * cot[:, lo:hi]).sum() for lo, hi in segments(LENGTHS) if hi > lo))
    names = ["x"] + [n for n, p in m.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, packed, separate):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("fw_name", FRAMEWORKS)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_states_per_sequence(kind, fw_name):
    """Two packed calls with the state handed across equal each whole sequence on its own; the
    state has a row per sequence, an empty sequence's row the state of no tokens."""
    fw = _framework(fw_name)
    m = _mixer(fw, kind, causal=True)
    x = _x(sum(LENGTHS), seed=4)
    whole = [x[:, lo:hi] for lo, hi in segments(LENGTHS)]
    first = np.concatenate([w[:, :n] for w, n in zip(whole, FIRST)], 1)
    second = np.concatenate([w[:, n:] for w, n in zip(whole, FIRST)], 1)
    y1, state = m(fw.array(first), cu_seqlens=fw.array(offsets_of(FIRST)), return_state=True)
    assert all(a.shape[0] == len(LENGTHS) for a in state)
    y2, state = m(fw.array(second), cu_seqlens=fw.array(offsets_of(SECOND)), state=state, return_state=True)
    y1, y2 = fw.numpy(y1), fw.numpy(y2)
    for s, ((lo1, hi1), (lo2, hi2), w) in enumerate(zip(segments(FIRST), segments(SECOND), whole)):
        if w.shape[1] == 0:
            for a in state:  # no tokens: the zero state (softmax: a cache of masked slots)
                assert not fw.numpy(a[s]).any()
            continue
        want, want_state = m(fw.array(w), return_state=True)
        want = fw.numpy(want)
        np.testing.assert_allclose(np.concatenate([y1[:, lo1:hi1], y2[:, lo2:hi2]], 1), want, **fw.tol)
        got_state = _state_rows(state, s)
        if kind == "softmax":  # the cache rows are padded with masked slots to the longest
            keep = fw.numpy(got_state[2])[0]
            assert keep.sum() == w.shape[1]
            got_state = [fw.numpy(got_state[0])[:, :, keep], fw.numpy(got_state[1])[:, :, keep]]
            want_state = want_state[:2]
        for got, ref in zip(got_state, want_state):
            np.testing.assert_allclose(np.asarray(got if isinstance(got, np.ndarray) else fw.numpy(got)),
                                       fw.numpy(ref), **fw.tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_mixer_gradients_equal_separate_runs_mlx(kind, causal):
    """MLX, float32: the gradients of x and of every parameter of one packed call (mx.grad and
    nn.value_and_grad) equal those of the separate calls, summed over the sequences."""
    fw = _framework("mlx")
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    m = _mixer(fw, kind, causal)
    x = mx.array(_x(sum(LENGTHS), seed=2))
    cot = mx.array(np.random.default_rng(3).standard_normal(x.shape).astype(np.float32))
    offsets = mx.array(offsets_of(LENGTHS))

    def packed(model, x):
        return (model(x, cu_seqlens=offsets) * cot).sum()

    def separate(model, x):
        return sum((model(x[:, lo:hi]) * cot[:, lo:hi]).sum() for lo, hi in segments(LENGTHS) if hi > lo)

    for name, got, want in [("x", mx.grad(lambda x: packed(m, x))(x), mx.grad(lambda x: separate(m, x))(x))] + [
        (name, got, want) for (name, got), (_, want) in zip(tree_flatten(nn.value_and_grad(m, packed)(m, x)[1]),
                                                            tree_flatten(nn.value_and_grad(m, separate)(m, x)[1]))]:
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5, err_msg=name)
        if name == "x":
            assert np.abs(np.array(got)).max() > 1e-3  # not vacuous


@pytest.mark.parametrize("fw_name", FRAMEWORKS)
def test_gma_layer_packed_with_initial_state(fw_name):
    """The GMA layer itself: a packed call from given per-sequence states equals the separate
    calls from those states (outputs and final states)."""
    fw = _framework(fw_name)
    m = _mixer(fw, "gma", causal=True)
    x = _x(sum(LENGTHS), seed=5)
    rng = np.random.default_rng(6)
    S, K, Dv = len(LENGTHS), 5, D_MODEL // HEADS
    state = (rng.random((S, HEADS, K, Dv)), rng.random((S, HEADS, K)))
    if fw.name == "mlx":
        state = tuple(a.astype(np.float32) for a in state)
    y, final = m(fw.array(x), state=tuple(fw.array(a) for a in state), return_state=True,
                 cu_seqlens=fw.array(offsets_of(LENGTHS)))
    for s, (lo, hi) in enumerate(segments(LENGTHS)):
        if hi == lo:
            for got, given in zip(final, state):
                np.testing.assert_allclose(fw.numpy(got)[s], given[s], **fw.tol)
            continue
        want, want_final = m(fw.array(x[:, lo:hi]), state=tuple(fw.array(a[s: s + 1]) for a in state),
                             return_state=True)
        np.testing.assert_allclose(fw.numpy(y)[:, lo:hi], fw.numpy(want), **fw.tol)
        for got, ref in zip(final, want_final):
            np.testing.assert_allclose(fw.numpy(got)[s: s + 1], fw.numpy(ref), **fw.tol)


def test_performer_redraws_once_per_packed_call():
    """With redraw, a training-mode packed call draws one set of features for all its sequences."""
    m = build_mixer("performer", framework="torch", d_model=D_MODEL, num_heads=HEADS, causal=True, num_features=12,
                    redraw=True).double()
    x = Torch.array(_x(sum(LENGTHS), seed=7))
    y = m(x, cu_seqlens=torch.from_numpy(offsets_of(LENGTHS)))  # training mode: draws features
    m.eval()
    torch.testing.assert_close(y, m(x, cu_seqlens=torch.from_numpy(offsets_of(LENGTHS))), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Blocks and models
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fw_name", FRAMEWORKS)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_block_equals_separate_runs(kind, fw_name):
    fw = _framework(fw_name)
    _seed(fw, 0)
    block = fw.prepare(build_block(kind, framework=fw.name, **_config(kind, causal=True)))
    x = _x(sum(LENGTHS), seed=8)
    y = fw.numpy(block(fw.array(x), cu_seqlens=fw.array(offsets_of(LENGTHS))))
    for lo, hi in segments(LENGTHS):
        if hi > lo:
            np.testing.assert_allclose(y[:, lo:hi], fw.numpy(block(fw.array(x[:, lo:hi]))), **fw.tol)


def _model(fw, kind, causal=True, **kw):
    _seed(fw, 0)
    return fw.prepare(build_model(kind, framework=fw.name, vocab_size=VOCAB, num_layers=2, max_len=20,
                                  **_config(kind, causal), **kw))


def _tokens(fw, N, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (1, N)).astype(fw.tokens)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fw_name", FRAMEWORKS)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_model_logits_equal_separate_runs(kind, fw_name, causal):
    """Positions restart at each sequence: the packed logits are each sequence's own. (Without the
    restart, every sequence after the first would read other positions' embeddings; the whole row
    of 32 tokens does not even fit max_len = 20 unpacked.)"""
    fw = _framework(fw_name)
    model = _model(fw, kind, causal)
    tokens = _tokens(fw, sum(LENGTHS), seed=9)
    logits = fw.numpy(model(fw.array(tokens), cu_seqlens=fw.array(offsets_of(LENGTHS))))
    assert logits.shape == (1, sum(LENGTHS), VOCAB)
    for lo, hi in segments(LENGTHS):
        if hi > lo:
            np.testing.assert_allclose(logits[:, lo:hi], fw.numpy(model(fw.array(tokens[:, lo:hi]))), **fw.tol,
                                       err_msg=f"sequence [{lo}, {hi})")
    with pytest.raises(ValueError, match="max_len=20"):
        model(fw.array(tokens))


@pytest.mark.parametrize("kind", KINDS)
def test_packed_model_gradients_equal_separate_runs(kind):
    model = _model(Torch, kind)
    tokens = torch.from_numpy(_tokens(Torch, sum(LENGTHS), seed=10))
    cot = torch.randn(1, sum(LENGTHS), VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    params = list(model.parameters())
    packed = torch.autograd.grad((model(tokens, cu_seqlens=torch.from_numpy(offsets_of(LENGTHS))) * cot).sum(),
                                 params)
    separate = torch.autograd.grad(sum((model(tokens[:, lo:hi]) * cot[:, lo:hi]).sum()
                                       for lo, hi in segments(LENGTHS) if hi > lo), params)
    for (name, _), got, want in zip(model.named_parameters(), packed, separate):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("fw_name", FRAMEWORKS)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_model_state_per_sequence(kind, fw_name):
    """Two packed calls with the model state handed across (positions continue per sequence) equal
    each whole sequence on its own."""
    fw = _framework(fw_name)
    model = _model(fw, kind)
    tokens = _tokens(fw, sum(LENGTHS), seed=12)
    whole = [tokens[:, lo:hi] for lo, hi in segments(LENGTHS)]
    first = np.concatenate([w[:, :n] for w, n in zip(whole, FIRST)], 1)
    second = np.concatenate([w[:, n:] for w, n in zip(whole, FIRST)], 1)
    y1, state = model(fw.array(first), cu_seqlens=fw.array(offsets_of(FIRST)), return_state=True)
    assert state[0] == FIRST
    y2, state = model(fw.array(second), cu_seqlens=fw.array(offsets_of(SECOND)), state=state, return_state=True)
    assert state[0] == LENGTHS and len(state[1]) == 2
    y1, y2 = fw.numpy(y1), fw.numpy(y2)
    for (lo1, hi1), (lo2, hi2), w in zip(segments(FIRST), segments(SECOND), whole):
        if w.shape[1]:
            np.testing.assert_allclose(np.concatenate([y1[:, lo1:hi1], y2[:, lo2:hi2]], 1),
                                       fw.numpy(model(fw.array(w))), **fw.tol)
    with pytest.raises(ValueError, match="pass their cu_seqlens"):
        model(fw.array(first), state=state)
    with pytest.raises(ValueError, match="for 5 sequences, cu_seqlens has S = 2"):
        model(fw.array(first), state=state, cu_seqlens=fw.array(np.array([0, 4, 18])))
    with pytest.raises(ValueError, match="max_len=20"):  # sequence 2 is at 17: 17 + 4 > 20
        model(fw.array(first[:, :18]), state=state, cu_seqlens=fw.array(offsets_of([3, 1, 4, 0, 10])))


@pytest.mark.parametrize("fw_name", FRAMEWORKS)
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_packed_classifier_pools_per_sequence(fw_name, pooling):
    fw = _framework(fw_name)
    model = _model(fw, "linear", causal=False, head="classification", num_classes=3, pooling=pooling)
    tokens = _tokens(fw, sum(LENGTHS), seed=13)
    logits = fw.numpy(model(fw.array(tokens), cu_seqlens=fw.array(offsets_of(LENGTHS))))
    assert logits.shape == (len(LENGTHS), 3)
    for s, (lo, hi) in enumerate(segments(LENGTHS)):
        if hi > lo:
            np.testing.assert_allclose(logits[s: s + 1], fw.numpy(model(fw.array(tokens[:, lo:hi]))), **fw.tol)
        else:  # no tokens pool to zeros: the head's bias
            np.testing.assert_allclose(logits[s], fw.numpy(model.head.bias), **fw.tol)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
BAD_OFFSETS = [
    (np.array([[0, 32]]), ValueError, "'cu_seqlens' must have 1 dimensions"),
    (np.array([0.0, 32.0]), TypeError, "'cu_seqlens' must be an int32 or int64"),
    (np.array([0]), ValueError, "S \\+ 1 >= 2 offsets"),
    (np.array([1, 32]), ValueError, "must start at 0, got 1"),
    (np.array([0, 5, 31]), ValueError, "must end at N = 32"),
    (np.array([0, 9, 4, 32]), ValueError, "must not decrease, got 9 then 4"),
]


@pytest.mark.parametrize("case", range(len(BAD_OFFSETS)))
@pytest.mark.parametrize("fw_name", FRAMEWORKS)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_offsets_rejected(kind, fw_name, case):
    fw = _framework(fw_name)
    offsets, error, message = BAD_OFFSETS[case]
    if fw.name == "mlx" and kind == "gma" and case >= 3:
        # The MLX op's native backend (its default on Apple silicon) checks the values in its own words.
        message = "'cu_seqlens' must (start|end|not decrease|run from 0 to N = 32)"
    m = _mixer(fw, kind, causal=True)
    offsets = fw.array(offsets if offsets.dtype != np.float64 or fw.name == "torch" else offsets.astype(np.float32))
    with pytest.raises(error, match=message):
        m(fw.array(_x(32)), cu_seqlens=offsets)
    if case >= 3:  # the model's own check of the values (for the positions)
        model = _model(fw, kind)
        with pytest.raises(error, match=message):
            model(fw.array(_tokens(fw, 32)), cu_seqlens=offsets)


@pytest.mark.parametrize("fw_name", FRAMEWORKS)
@pytest.mark.parametrize("kind", KINDS)
def test_offsets_need_one_row_no_mask_and_a_state_row_per_sequence(kind, fw_name):
    fw = _framework(fw_name)
    m = _mixer(fw, kind, causal=True)
    offsets = fw.array(offsets_of([10, 10]))
    x = _x(20)
    with pytest.raises(ValueError, match="B = 1, got B = 2"):
        m(fw.array(np.concatenate([x, x])), cu_seqlens=offsets)
    mask = fw.array(np.ones((1, 20), dtype=bool))
    with pytest.raises(ValueError, match="'key_padding_mask' cannot be combined with 'cu_seqlens'"):
        m(fw.array(x), key_padding_mask=mask, cu_seqlens=offsets)
    _, state = m(fw.array(x[:, :7]), return_state=True)  # one row, for two sequences
    with pytest.raises(ValueError, match="S"):
        m(fw.array(x), state=state, cu_seqlens=offsets)
    model = _model(fw, kind)
    tokens = fw.array(_tokens(fw, 20))
    with pytest.raises(ValueError, match="'key_padding_mask' cannot be combined with 'cu_seqlens'"):
        model(tokens, key_padding_mask=mask, cu_seqlens=offsets)
    if fw.name == "torch":
        with pytest.raises(TypeError, match="cu_seqlens"):
            m(fw.array(x), cu_seqlens=offsets_of([10, 10]))  # a NumPy array for a torch module
