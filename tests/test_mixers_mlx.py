"""MLX mixers: weight exchange with torch (every kind, both directions), gradients, blocks, models.

The behavioural checks (causality, masks, stepping) of the MLX mixers are parametrized in
test_mixers.py next to the torch ones.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx.utils import tree_flatten  # noqa: E402

from gmattn.mixers import KINDS, MixerConfig, available_kinds, build_mixer, build_model  # noqa: E402

D_MODEL, HEADS = 32, 2


def _cfg(kind, causal, **kw):
    return MixerConfig(kind=kind, d_model=D_MODEL, num_heads=HEADS, causal=causal, num_components=6,
                       num_features=24, bias=True, **kw)


def _x(B, N, seed=0):
    return np.random.default_rng(seed).standard_normal((B, N, D_MODEL)).astype(np.float32)


def _pair(kind, causal, direction):
    """(source, destination, to_src, to_dst, numpy) with destination loaded from source's export."""
    torch.manual_seed(1)
    mx.random.seed(2)
    t = build_mixer(_cfg(kind, causal, seed=3), framework="torch").eval()
    m = build_mixer(_cfg(kind, causal, seed=4), framework="mlx")
    m.eval()
    if direction == "torch->mlx":
        m.import_weights(t.export_weights())
    else:
        t.import_weights(m.export_weights())
    return t, m


@pytest.mark.parametrize("direction", ["torch->mlx", "mlx->torch"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_weight_exchange_gives_same_outputs(kind, causal, direction):
    t, m = _pair(kind, causal, direction)
    wt, wm = t.export_weights(), m.export_weights()
    assert sorted(wt) == sorted(wm)
    for name in wt:
        np.testing.assert_array_equal(wt[name], wm[name])
        assert wt[name].dtype == np.float32
    x = _x(2, 70, seed=5)  # longer than one chunk of the causal scans
    mask = np.ones((2, 70), dtype=bool)
    mask[0, 40:] = False
    mask[1, 7] = False
    with torch.no_grad():
        yt = t(torch.from_numpy(x), key_padding_mask=torch.from_numpy(mask)).numpy()
        yt_plain = t(torch.from_numpy(x)).numpy()
    ym = np.array(m(mx.array(x), key_padding_mask=mx.array(mask)))
    ym_plain = np.array(m(mx.array(x)))
    np.testing.assert_allclose(ym, yt, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ym_plain, yt_plain, rtol=0, atol=1e-5)
    assert np.abs(yt).max() > 1e-2  # not trivially zero


@pytest.mark.parametrize("kind", KINDS)
def test_state_moves_between_frameworks(kind):
    """A sequence started in torch continues in MLX: states are plain arrays of the same layout."""
    t, m = _pair(kind, True, "torch->mlx")
    x = _x(1, 12, seed=6)
    with torch.no_grad():
        full = t(torch.from_numpy(x)).numpy()
        _, state = t(torch.from_numpy(x[:, :5]), return_state=True)
    state_mx = tuple(mx.array(s.numpy()) for s in state)
    y, new_state = m(mx.array(x[:, 5:]), state=state_mx, return_state=True)
    np.testing.assert_allclose(np.array(y), full[:, 5:], rtol=0, atol=1e-5)
    assert len(new_state) == len(state)


@pytest.mark.parametrize("kind", KINDS)
def test_mlx_gradients_reach_every_trainable_parameter(kind):
    m = build_mixer(_cfg(kind, True), framework="mlx")
    x = mx.array(_x(2, 9))
    mask = mx.array(np.arange(9)[None, :] < np.array([[9], [6]]))

    def loss(params, x):
        m.update(params)
        return (m(x, key_padding_mask=mask) ** 2).sum()

    params = m.trainable_parameters()
    value, (grads, gx) = mx.value_and_grad(loss, argnums=(0, 1))(params, x)
    assert np.isfinite(value.item())
    flat = dict(tree_flatten(grads))
    expected = {k for k, _ in tree_flatten(m.parameters())} - ({"features"} if kind == "performer" else set())
    assert set(flat) == expected
    for name, g in flat.items():
        g = np.array(g)
        assert np.isfinite(g).all() and np.abs(g).sum() > 0, name
    assert np.abs(np.array(gx)).sum() > 0


def test_mlx_performer_features_frozen_seeded_and_redrawn():
    cfg = _cfg("performer", True, seed=11, redraw=True)
    a, b = build_mixer(cfg, framework="mlx"), build_mixer(cfg, framework="mlx")
    t = build_mixer(cfg, framework="torch")
    np.testing.assert_array_equal(np.array(a.features), np.array(b.features))
    np.testing.assert_array_equal(np.array(a.features), t.features.numpy())  # same seed, same draw
    assert "features" not in dict(tree_flatten(a.trainable_parameters()))
    W = np.array(a.features)
    a.eval()
    a(mx.array(_x(1, 3)))
    np.testing.assert_array_equal(np.array(a.features), W)
    a.train()
    a(mx.array(_x(1, 3)))
    assert not np.array_equal(np.array(a.features), W)
    assert "features" not in dict(tree_flatten(a.trainable_parameters()))  # still frozen


@pytest.mark.parametrize("direction", ["torch->mlx", "mlx->torch"])
@pytest.mark.parametrize("kind", ["gma", "performer"])
def test_model_weight_exchange(kind, direction):
    cfg = _cfg(kind, True, seed=0)
    kw = dict(vocab_size=17, num_layers=2, max_len=32)
    torch.manual_seed(0)
    t = build_model(cfg, framework="torch", **kw).eval()
    m = build_model(cfg, framework="mlx", **kw)
    m.eval()
    if direction == "torch->mlx":
        m.import_weights(t.export_weights())
    else:
        t.import_weights(m.export_weights())
    tokens = np.random.default_rng(0).integers(0, 17, (2, 20))
    with torch.no_grad():
        lt = t(torch.from_numpy(tokens)).numpy()
    lm = np.array(m(mx.array(tokens.astype(np.int32))))
    np.testing.assert_allclose(lm, lt, rtol=0, atol=1e-4)

    clf_kw = dict(vocab_size=17, num_layers=1, head="classification", num_classes=4, pooling="last")
    tc = build_model(cfg, framework="torch", **clf_kw).eval()
    mc = build_model(cfg, framework="mlx", **clf_kw)
    mc.eval()
    mc.import_weights(tc.export_weights())
    mask = np.arange(20)[None, :] < np.array([[20], [13]])
    with torch.no_grad():
        ct = tc(torch.from_numpy(tokens), key_padding_mask=torch.from_numpy(mask)).numpy()
    cm = np.array(mc(mx.array(tokens.astype(np.int32)), key_padding_mask=mx.array(mask)))
    np.testing.assert_allclose(cm, ct, rtol=0, atol=1e-4)


def test_available_kinds_mlx():
    kinds = available_kinds("mlx")
    assert kinds == KINDS
