"""SequenceMixer API: config, calling convention, causality, masks, state, baselines' math, blocks.

The behavioural checks run for every kind in both frameworks (MLX cases skip with a reason when
MLX, or the MLX GMA layer, is missing). Cross-framework weight exchange is in test_mixers_mlx.py.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gmattn.mixers import (CAUSAL_STATE, KINDS, MixerConfig, available_kinds, build_block, build_mixer,  # noqa: E402
                           build_model, export_weights, import_weights, read_weights, save_weights)

HAS_MLX = importlib.util.find_spec("mlx") is not None
D_MODEL, HEADS = 32, 2


class Torch:
    name = "torch"

    @staticmethod
    def array(a, dtype=None):
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t

    @staticmethod
    def numpy(t):
        return t.detach().cpu().numpy()

    @staticmethod
    def cat(parts, axis):
        return torch.cat(parts, dim=axis)


class MLX:
    name = "mlx"

    @staticmethod
    def array(a, dtype=None):
        import mlx.core as mx

        return mx.array(np.ascontiguousarray(a))

    @staticmethod
    def numpy(t):
        return np.array(t)

    @staticmethod
    def cat(parts, axis):
        import mlx.core as mx

        return mx.concatenate(parts, axis=axis)


def _framework(name):
    if name == "mlx" and not HAS_MLX:
        pytest.skip("MLX is not installed")
    return Torch if name == "torch" else MLX


def _mixer(fw, kind, causal, seed=0, **kw):
    torch.manual_seed(seed)
    if fw.name == "mlx":
        import mlx.core as mx

        mx.random.seed(seed)
    cfg = MixerConfig(kind=kind, d_model=D_MODEL, num_heads=HEADS, causal=causal, num_components=6,
                      num_features=24, seed=seed, **kw)
    m = build_mixer(cfg, framework=fw.name)
    m.eval()
    return m


def _x(B, N, seed=0):
    return np.random.default_rng(seed).standard_normal((B, N, D_MODEL)).astype(np.float32)


FRAMEWORKS = ["torch", "mlx"]
ALL = [(f, k) for f in FRAMEWORKS for k in KINDS]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def test_config_json_round_trip_and_validation():
    cfg = MixerConfig(kind="performer", d_model=64, num_heads=4, causal=True, num_features=32, redraw=True, seed=3)
    back = MixerConfig.from_json(cfg.to_json())
    assert back == cfg and json.loads(cfg.to_json())["num_features"] == 32
    assert cfg.resolved_head_dim == 16 and cfg.resolved_num_features == 32
    assert MixerConfig(kind="gma", d_model=64, num_heads=4).resolved_routing_dim == 16
    assert MixerConfig(kind="performer", d_model=64, num_heads=4).resolved_num_features == 32
    with pytest.raises(ValueError, match="kind"):
        MixerConfig(kind="mamba")
    with pytest.raises(ValueError, match="divisible"):
        MixerConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown fields"):
        MixerConfig.from_dict({"kind": "gma", "colour": 1})
    with pytest.raises(ValueError, match="feature_map"):
        MixerConfig(kind="linear", feature_map="tanh")
    assert set(CAUSAL_STATE) == set(KINDS)


def test_build_mixer_accepts_config_dict_or_kind():
    a = build_mixer("linear", d_model=16, num_heads=2, causal=True)
    b = build_mixer({"kind": "linear", "d_model": 16}, num_heads=2)
    c = build_mixer(MixerConfig(kind="softmax", d_model=16, num_heads=2), causal=True)
    assert a.config.causal and a.config.kind == "linear" and b.config.num_heads == 2
    assert c.config.kind == "softmax" and c.config.causal
    assert isinstance(build_mixer("gma", d_model=16, num_heads=2), torch.nn.Module)
    with pytest.raises(ValueError, match="framework"):
        build_mixer("gma", framework="jax")
    assert available_kinds("torch") == KINDS


# ----------------------------------------------------------------------------------------------
# Calling convention, causality, masks, state: every kind, both frameworks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fw_name,kind", ALL)
def test_causality(fw_name, kind):
    fw = _framework(fw_name)
    m = _mixer(fw, kind, causal=True)
    x = _x(2, 24)
    y = fw.numpy(m(fw.array(x)))
    assert y.shape == (2, 24, D_MODEL) and np.isfinite(y).all()
    i = 13
    x2 = x.copy()
    x2[:, i + 1:] = _x(2, 24 - i - 1, seed=5) * 3
    y2 = fw.numpy(m(fw.array(x2)))
    np.testing.assert_allclose(y2[:, : i + 1], y[:, : i + 1], rtol=0, atol=1e-6)
    assert np.abs(y2[:, i + 1:] - y[:, i + 1:]).max() > 1e-3
    # The bidirectional twin does see the future: the test above is not vacuous.
    b = _mixer(fw, kind, causal=False)
    assert np.abs(fw.numpy(b(fw.array(x2)))[:, :i] - fw.numpy(b(fw.array(x)))[:, :i]).max() > 1e-4


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fw_name,kind", ALL)
def test_padding_mask_equals_unpadded_runs(fw_name, kind, causal):
    fw = _framework(fw_name)
    m = _mixer(fw, kind, causal=causal)
    lengths = [17, 9]
    x = _x(2, 20, seed=1)
    mask = np.zeros((2, 20), dtype=bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
        x[b, n:] = 100.0  # garbage in the padding must not leak
    y = fw.numpy(m(fw.array(x), key_padding_mask=fw.array(mask)))
    assert np.isfinite(y).all()
    for b, n in enumerate(lengths):
        ref = fw.numpy(m(fw.array(x[b: b + 1, :n])))
        np.testing.assert_allclose(y[b, :n], ref[0], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("fw_name,kind", ALL)
def test_masked_positions_are_not_read(fw_name, kind):
    fw = _framework(fw_name)
    m = _mixer(fw, kind, causal=False)
    x = _x(2, 16, seed=2)
    mask = np.random.default_rng(0).random((2, 16)) > 0.4
    mask[:, 0] = True
    y = fw.numpy(m(fw.array(x), key_padding_mask=fw.array(mask)))
    x2 = x.copy()
    x2[~mask] = -7.0
    y2 = fw.numpy(m(fw.array(x2), key_padding_mask=fw.array(mask)))
    np.testing.assert_allclose(y2[mask], y[mask], rtol=1e-5, atol=2e-6)
    y_nomask = fw.numpy(m(fw.array(x)))
    assert np.abs(y_nomask[mask] - y[mask]).max() > 1e-4  # the mask changes something


@pytest.mark.parametrize("fw_name,kind", ALL)
def test_state_stepping_equals_full_run(fw_name, kind):
    fw = _framework(fw_name)
    m = _mixer(fw, kind, causal=True)
    N = 12
    x = _x(2, N, seed=3)
    mask = np.ones((2, N), dtype=bool)
    mask[1, 4] = mask[0, 9] = False  # holes, carried across pieces
    full, full_state = m(fw.array(x), key_padding_mask=fw.array(mask), return_state=True)
    full = fw.numpy(full)
    # Token by token.
    state, outs = None, []
    for i in range(N):
        y, state = m(fw.array(x[:, i: i + 1]), key_padding_mask=fw.array(mask[:, i: i + 1]), state=state,
                     return_state=True)
        outs.append(fw.numpy(y))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=2e-6)
    for a, b in zip(state, full_state):
        np.testing.assert_allclose(fw.numpy(a), fw.numpy(b), rtol=1e-5, atol=2e-6)
    # Uneven pieces.
    state, outs = None, []
    for lo, hi in [(0, 5), (5, 6), (6, N)]:
        y, state = m(fw.array(x[:, lo:hi]), key_padding_mask=fw.array(mask[:, lo:hi]), state=state,
                     return_state=True)
        outs.append(fw.numpy(y))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("fw_name,kind", ALL)
def test_state_shapes(fw_name, kind):
    fw = _framework(fw_name)
    m = _mixer(fw, kind, causal=True)
    _, state = m(fw.array(_x(2, 7)), return_state=True)
    shapes = [tuple(s.shape) for s in state]
    H, Dh = HEADS, D_MODEL // HEADS
    expected = {
        "gma": [(2, H, 6, Dh), (2, H, 6)],
        "linear": [(2, H, Dh, Dh), (2, H, Dh)],
        "performer": [(2, H, 24, Dh), (2, H, 24)],
        "softmax": [(2, H, 7, Dh), (2, H, 7, Dh), (2, 7)],
        "ssm": [(2, H, Dh, 64), (2, 3, H * Dh + 2 * 64)],
    }[kind]
    assert shapes == expected
    if kind != "softmax":
        assert "float32" in str(state[0].dtype) and "float32" in str(state[1].dtype)


# ----------------------------------------------------------------------------------------------
# The baselines compute what they claim (torch; the MLX twins are compared by exchange)
# ----------------------------------------------------------------------------------------------
def _heads(m, x):
    B, N, _ = x.shape
    split = lambda t, d: t.view(B, N, HEADS, d).transpose(1, 2).double()  # noqa: E731
    Dh = D_MODEL // HEADS
    return split(m.q_proj(x), Dh), split(m.k_proj(x), Dh), split(m.v_proj(x), Dh)


def _merge(m, o):
    B, H, N, Dv = o.shape
    return m.out_proj(o.float().transpose(1, 2).reshape(B, N, H * Dv))


@pytest.mark.parametrize("causal", [False, True])
def test_linear_and_softmax_match_naive_quadratic_reference(causal):
    x = torch.from_numpy(_x(2, 70, seed=4))  # > one chunk of the causal scan
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[0, 50:] = False
    mask[1, 3] = False
    allowed = mask[:, None, None, :].expand(2, 1, 70, 70)
    if causal:
        allowed = allowed & torch.ones(70, 70, dtype=torch.bool).tril()
    with torch.no_grad():
        lin = build_mixer("linear", d_model=D_MODEL, num_heads=HEADS, causal=causal)
        q, k, v = _heads(lin, x)
        phi = lambda t: torch.nn.functional.elu(t) + 1  # noqa: E731
        A = (phi(q) @ phi(k).transpose(-1, -2)) * allowed
        ref = _merge(lin, (A @ v) / (A.sum(-1, keepdim=True) + 1e-6))
        torch.testing.assert_close(lin(x, key_padding_mask=mask), ref, rtol=1e-5, atol=1e-5)

        sm = build_mixer("softmax", d_model=D_MODEL, num_heads=HEADS, causal=causal)
        q, k, v = _heads(sm, x)
        s = (q @ k.transpose(-1, -2)) / (D_MODEL // HEADS) ** 0.5
        ref = _merge(sm, torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v)
        torch.testing.assert_close(sm(x, key_padding_mask=mask), ref, rtol=1e-5, atol=1e-5)


def test_favor_features_are_unbiased():
    from gmattn.mixers._common import orthogonal_random_features
    from gmattn.mixers.torch_mixers import favor_features

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 8, 16, generator=g, dtype=torch.float64) * 0.6
    k = torch.randn(1, 1, 8, 16, generator=g, dtype=torch.float64) * 0.6
    exact = torch.exp(q @ k.transpose(-1, -2) / 4.0)
    W = torch.from_numpy(orthogonal_random_features(1, 131072, 16, seed=0)).double()
    ratio = (favor_features(q, W, False) @ favor_features(k, W, False).transpose(-1, -2)) / exact
    assert abs(ratio.mean().item() - 1.0) < 0.012 and ratio.std().item() < 0.03
    # Orthogonal blocks, rows with Gaussian norms.
    block = W[0, :16]
    off = block @ block.T - torch.diag(torch.diagonal(block @ block.T))
    assert off.abs().max() < 1e-4


def test_performer_converges_to_softmax():
    x = torch.from_numpy(_x(1, 32, seed=6))
    errs = {}
    for M in (16, 32768):
        cfg = MixerConfig(kind="performer", d_model=D_MODEL, num_heads=HEADS, num_features=M, seed=0)
        torch.manual_seed(0)
        perf = build_mixer(cfg)
        sm = build_mixer(cfg.replace(kind="softmax"))
        sm.import_weights({k: v for k, v in perf.export_weights().items() if k != "features"})
        with torch.no_grad():
            ref = sm(x)
            errs[M] = ((perf(x) - ref).norm() / ref.norm()).item()
    assert errs[32768] < 0.045 and errs[16] > 4 * errs[32768], errs


def test_performer_features_exported_seeded_and_redrawn():
    cfg = MixerConfig(kind="performer", d_model=D_MODEL, num_heads=HEADS, num_features=24, seed=7, redraw=True)
    a, b = build_mixer(cfg), build_mixer(cfg)
    torch.testing.assert_close(a.features, b.features)  # same seed, same draw
    assert a.export_weights()["features"].shape == (HEADS, 24, D_MODEL // HEADS)
    assert "features" not in dict(a.named_parameters())  # a buffer, never trained
    W = a.features.clone()
    a.eval()
    a(torch.randn(1, 4, D_MODEL))
    torch.testing.assert_close(a.features, W)  # no redraw in eval mode
    a.train()
    _, state = a(torch.randn(1, 4, D_MODEL), return_state=True)
    assert not torch.equal(a.features, W)  # redrawn in training mode
    W2 = a.features.clone()
    a(torch.randn(1, 4, D_MODEL), state=state)
    torch.testing.assert_close(a.features, W2)  # never while continuing a state
    a.redraw_features(seed=7)
    torch.testing.assert_close(a.features, W)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    m = _mixer(Torch, kind, causal=True)
    x = torch.from_numpy(_x(2, 9)).requires_grad_(True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 7:] = False
    m(x, key_padding_mask=mask).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_float64(kind):
    m = _mixer(Torch, kind, causal=True).double()
    x = torch.from_numpy(_x(1, 10)).double()
    y, state = m(x, return_state=True)
    assert y.dtype == torch.float64 and torch.isfinite(y).all()
    y32 = _mixer(Torch, kind, causal=True)(x.float())
    torch.testing.assert_close(y.float(), y32, rtol=1e-4, atol=1e-5)


def test_softmax_fully_masked_rows_are_zero_not_nan():
    m = _mixer(Torch, "softmax", causal=True)
    mask = torch.tensor([[False, False, True, True]])
    y = m(torch.randn(1, 4, D_MODEL), key_padding_mask=mask)
    assert torch.isfinite(y).all()
    bias = m.out_proj.bias if m.out_proj.bias is not None else torch.zeros(D_MODEL)
    torch.testing.assert_close(y[0, :2], bias.expand(2, D_MODEL))


def test_weights_file_round_trip(tmp_path):
    a = _mixer(Torch, "gma", causal=False, seed=1)
    b = _mixer(Torch, "gma", causal=False, seed=2)
    path = str(tmp_path / "w.npz")
    save_weights(path, export_weights(a))
    import_weights(b, read_weights(path))
    x = torch.from_numpy(_x(1, 5))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    with pytest.raises(KeyError, match="missing"):
        b.import_weights({"mu": a.mu.detach().numpy()})
    bad = export_weights(a)
    bad["mu"] = bad["mu"][:, :2]
    with pytest.raises(ValueError, match="shape"):
        b.import_weights(bad)


# ----------------------------------------------------------------------------------------------
# Blocks and models
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fw_name", FRAMEWORKS)
def test_block_is_prenorm_residual_and_steps(fw_name):
    fw = _framework(fw_name)
    kind = "linear"
    block = build_block(kind, framework=fw_name, d_model=D_MODEL, num_heads=HEADS, causal=True)
    x = _x(2, 10)
    y = fw.numpy(block(fw.array(x)))
    assert y.shape == x.shape
    # Zeroing the mixer's and the MLP's output projections leaves the identity (pure residual).
    w = export_weights(block)
    zeroed = {k: (np.zeros_like(v) if k.startswith(("mixer.out_proj", "fc2")) else v) for k, v in w.items()}
    block.import_weights(zeroed)
    np.testing.assert_allclose(fw.numpy(block(fw.array(x))), x, atol=1e-6)
    block.import_weights(w)
    y1, s = block(fw.array(x[:, :4]), return_state=True)
    y2, s = block(fw.array(x[:, 4:]), state=s, return_state=True)
    np.testing.assert_allclose(np.concatenate([fw.numpy(y1), fw.numpy(y2)], 1), y, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("fw_name", FRAMEWORKS)
@pytest.mark.parametrize("kind", ["gma", "softmax"])
def test_lm_model_stepping_equals_full_run(fw_name, kind):
    fw = _framework(fw_name)
    model = build_model(kind, framework=fw_name, vocab_size=11, num_layers=2, max_len=16, tie_embeddings=True,
                        d_model=D_MODEL, num_heads=HEADS, causal=True, num_components=4)
    tokens = np.random.default_rng(0).integers(0, 11, (2, 9)).astype(np.int64 if fw_name == "torch" else np.int32)
    full = fw.numpy(model(fw.array(tokens)))
    assert full.shape == (2, 9, 11)
    state, outs = None, []
    for lo, hi in [(0, 3), (3, 4), (4, 9)]:
        y, state = model(fw.array(tokens[:, lo:hi]), state=state, return_state=True)
        outs.append(fw.numpy(y))
    assert state[0] == 9
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        model(fw.array(tokens[:, :8]), state=state)


@pytest.mark.parametrize("fw_name", FRAMEWORKS)
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_classifier_pooling_respects_mask(fw_name, pooling):
    fw = _framework(fw_name)
    model = build_model("performer", framework=fw_name, vocab_size=13, num_layers=1, head="classification",
                        num_classes=3, pooling=pooling, d_model=D_MODEL, num_heads=HEADS, seed=0)
    if fw_name == "torch":
        model.eval()
    itype = np.int64 if fw_name == "torch" else np.int32
    tokens = np.random.default_rng(1).integers(0, 13, (2, 8)).astype(itype)
    mask = np.ones((2, 8), dtype=bool)
    mask[0, 5:] = False
    logits = fw.numpy(model(fw.array(tokens), key_padding_mask=fw.array(mask)))
    assert logits.shape == (2, 3)
    other = tokens.copy()
    other[0, 5:] = (other[0, 5:] + 1) % 13
    np.testing.assert_allclose(fw.numpy(model(fw.array(other), key_padding_mask=fw.array(mask))), logits,
                               rtol=1e-5, atol=1e-6)
    alone = fw.numpy(model(fw.array(tokens[:1, :5])))
    np.testing.assert_allclose(logits[:1], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lm"):
        model(fw.array(tokens), return_state=True)


def test_importing_mixers_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys, gmattn.mixers as m; cfg = m.MixerConfig(kind='gma'); "
            "assert 'torch' not in sys.modules and 'mlx.core' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
