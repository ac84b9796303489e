"""gmattn.analysis: captured responsibilities against a manual re-computation, the statistics against
hand-built responsibilities with known answers, the stability measure against its definition, the plots."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gmattn import analysis, reference  # noqa: E402
from gmattn.mixers import build_mixer, build_model  # noqa: E402

HAS_MLX = importlib.util.find_spec("mlx") is not None
needs_mlx = pytest.mark.skipif(not HAS_MLX, reason="MLX is not installed")
FRAMEWORKS = ["torch", pytest.param("mlx", marks=needs_mlx)]
D_MODEL, HEADS, K = 32, 2, 6


class _Torch:
    @staticmethod
    def array(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    @staticmethod
    def numpy(t):
        return t.detach().double().numpy()

    @staticmethod
    def seed(s):
        torch.manual_seed(s)


class _MLX:
    @staticmethod
    def array(a):
        import mlx.core as mx

        a = np.ascontiguousarray(a)
        return mx.array(a.astype(np.int32) if a.dtype == np.int64 else a)

    @staticmethod
    def numpy(t):
        return np.array(t).astype(np.float64)

    @staticmethod
    def seed(s):
        import mlx.core as mx

        mx.random.seed(s)


def _fw(name):
    return _Torch if name == "torch" else _MLX


def _manual_gammas(fw, layer, u):
    """The layer's q / k projections of u, by hand, through gmattn.reference.responsibilities (float64)."""
    B, N, _ = u.shape
    D = layer.routing_dim
    params = [torch.from_numpy(fw.numpy(p)) for p in (layer.mu, layer.omega, layer.alpha)]
    out = {}
    for name, proj in (("q", layer.q_proj), ("k", layer.k_proj)):
        routed = torch.from_numpy(fw.numpy(proj(u))).reshape(B, N, HEADS, D)
        out[name] = reference.responsibilities(routed, *params, sigma_eps=layer.sigma_eps).numpy()
    return out


def _x(B, N, seed=0):
    return np.random.default_rng(seed).standard_normal((B, N, D_MODEL)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# capture_responsibilities
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_capture_from_a_layer_equals_reference_of_its_projections(framework):
    fw = _fw(framework)
    fw.seed(0)
    layer = build_mixer("gma", framework=framework, d_model=D_MODEL, num_heads=HEADS, num_components=K,
                        causal=True)
    x = fw.array(_x(3, 11))
    got = analysis.capture_responsibilities(layer, x)
    assert list(got) == [0] and set(got[0]) == {"q", "k"}
    want = _manual_gammas(fw, layer, x)
    for name in ("q", "k"):
        assert got[0][name].shape == (3, 11, HEADS, K) and got[0][name].dtype == np.float64
        np.testing.assert_allclose(got[0][name], want[name], rtol=0, atol=1e-12)
        np.testing.assert_allclose(got[0][name].sum(-1), 1.0, atol=1e-12)
    assert np.abs(got[0]["q"] - got[0]["k"]).max() > 1e-3  # q and k are different projections


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_capture_from_a_model_equals_block_by_block_recomputation(framework):
    fw = _fw(framework)
    fw.seed(1)
    model = build_model("gma", framework=framework, vocab_size=20, num_layers=3, max_len=16, d_model=D_MODEL,
                        num_heads=HEADS, num_components=K, causal=True, dropout=0.1)
    model.train()
    tokens = np.random.default_rng(2).integers(0, 20, (2, 12))
    mask = np.ones((2, 12), dtype=bool)
    mask[1, 9:] = False
    got = analysis.capture_responsibilities(model, fw.array(tokens), key_padding_mask=fw.array(mask))
    assert model.training  # the mode is restored
    assert sorted(got) == [0, 1, 2]
    # By hand: embedding + positions, then each block's norm1 output is its mixer's input.
    model.eval()
    t, m = fw.array(tokens), fw.array(mask)
    x = model.embed(t) + model.pos_embed(fw.array(np.arange(12)))
    for i, block in enumerate(model.blocks):
        want = _manual_gammas(fw, block.mixer, block.norm1(x))
        for name in ("q", "k"):
            g = got[i][name]
            assert np.isnan(g[1, 9:]).all() and not np.isnan(g[0]).any() and not np.isnan(g[1, :9]).any()
            np.testing.assert_allclose(g[mask], want[name][mask], rtol=0, atol=1e-12)
        x = block(x, key_padding_mask=m)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_capture_refuses_models_without_gma_and_other_objects(framework):
    model = build_model("linear", framework=framework, vocab_size=5, num_layers=1, d_model=D_MODEL,
                        num_heads=HEADS)
    with pytest.raises(ValueError, match="no GMA blocks"):
        analysis.capture_responsibilities(model, _fw(framework).array(np.zeros((1, 4), dtype=np.int64)))
    with pytest.raises(TypeError, match="SequenceModel"):
        analysis.capture_responsibilities(object(), None)
    layer = build_mixer("gma", framework=framework, d_model=D_MODEL, num_heads=HEADS, num_components=K)
    with pytest.raises(ValueError, match="d_model=32"):
        analysis.capture_responsibilities(layer, _fw(framework).array(_x(1, 4)[..., :8]))


# ----------------------------------------------------------------------------------------------
# routing_stats on hand-built responsibilities
# ----------------------------------------------------------------------------------------------
def _one_hot(indices, K):
    return np.eye(K)[np.asarray(indices)]


def test_usage_and_entropy_known_values():
    Kc, B, N = 4, 2, 8
    g = np.zeros((B, N, 4, Kc))
    g[:, :, 0] = 1.0 / Kc  # uniform: every component used, entropy log K
    g[:, :, 1] = _one_hot(np.zeros((B, N), dtype=int), Kc)  # one component: 1/K used, entropy 0
    half = np.zeros((B, N), dtype=int)
    half[:, N // 2:] = 1
    g[:, :, 2] = _one_hot(half, Kc)  # two components half the time each: 2/K used, entropy 0
    g[:, :, 3] = [0.5, 0.3, 0.2, 0.0]  # entropy by hand; component 3 unused
    stats = analysis.routing_stats(g)
    assert set(stats) == {"usage", "entropy"}
    np.testing.assert_allclose(stats["usage"], [1.0, 0.25, 0.5, 0.75])
    h3 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    np.testing.assert_allclose(stats["entropy"], [math.log(4), 0.0, 0.0, h3], atol=1e-12)


def test_usage_threshold_is_a_quarter_of_uniform():
    """Means of 1/(4K) exactly do not count; just above does."""
    Kc = 5
    thr = 1.0 / (4 * Kc)
    g = np.zeros((1, 2, 1, Kc))
    g[0, :, 0] = [thr, thr * 1.01, 0.0, 0.0, 0.0]
    g[0, :, 0, 2] = 1.0 - g[0, 0, 0].sum()
    assert analysis.routing_stats(g)["usage"][0] == pytest.approx(2 / Kc)


def test_nmi_known_values():
    B, N, Kc = 1, 8, 3
    labels = np.array([[0, 0, 0, 0, 1, 1, 1, 1]])
    g = np.zeros((B, N, 4, Kc))
    g[0, :, 0] = _one_hot([2, 2, 2, 2, 0, 0, 0, 0], Kc)  # arg-max determines the label: 1
    g[0, :, 3] = _one_hot([0, 0, 1, 1, 2, 2, 2, 2], Kc)  # also determines it, with more arg-max entropy: 1
    g[0, :, 1] = _one_hot([0, 1, 0, 1, 0, 1, 0, 1], Kc)  # independent of the label: 0
    g[0, :, 2] = _one_hot([0, 0, 0, 1, 1, 1, 1, 0], Kc)  # joint counts [[3, 1], [1, 3]]
    g = 0.7 * g + 0.1  # soft rows, same arg-max
    nmi = analysis.routing_stats(g, labels=labels)["nmi"]
    mi = 2 * (3 / 8) * math.log((3 / 8) / (1 / 4)) + 2 * (1 / 8) * math.log((1 / 8) / (1 / 4))
    np.testing.assert_allclose(nmi, [1.0, 0.0, mi / math.log(2), 1.0], atol=1e-12)
    # Label values need not be 0..L-1.
    np.testing.assert_allclose(analysis.routing_stats(g, labels=labels * 7 - 3)["nmi"], nmi, atol=1e-12)


def test_stats_skip_padded_rows_and_check_arguments():
    Kc = 4
    g = np.full((1, 6, 1, Kc), 1.0 / Kc)
    g[0, 4:] = np.nan  # padding
    g[0, :2, 0] = _one_hot([0, 0], Kc)
    labels = np.array([[0, 1, 0, 1, 5, 5]])
    stats = analysis.routing_stats(g, labels=labels)
    np.testing.assert_allclose(stats["entropy"], [0.5 * math.log(4)])
    full = analysis.routing_stats(g[:, :4], labels=labels[:, :4])
    for key in ("usage", "entropy", "nmi"):
        np.testing.assert_allclose(stats[key], full[key])
    with pytest.raises(ValueError, match=r"\(B, N, H, K\)"):
        analysis.routing_stats(g[0])
    with pytest.raises(ValueError, match="labels"):
        analysis.routing_stats(g, labels=labels[:, :3])
    with pytest.raises(ValueError, match="labels"):
        analysis.routing_stats(g, labels=labels.astype(float))
    with pytest.raises(ValueError, match="single value"):
        analysis.routing_stats(g, labels=np.zeros((1, 6), dtype=int))


def test_stats_of_captured_gammas_match_direct_computation():
    torch.manual_seed(3)
    layer = build_mixer("gma", framework="torch", d_model=D_MODEL, num_heads=HEADS, num_components=K)
    g = analysis.capture_responsibilities(layer, torch.from_numpy(_x(2, 30)))[0]["k"]
    stats = analysis.routing_stats(g)
    flat = g.reshape(-1, HEADS, K)
    np.testing.assert_allclose(stats["entropy"], (-(flat * np.log(flat)).sum(-1)).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["usage"], (flat.mean(0) > 1 / (4 * K)).sum(-1) / K)


# ----------------------------------------------------------------------------------------------
# routing_stability
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_stability_is_mean_total_variation_under_seeded_noise(framework):
    fw = _fw(framework)
    fw.seed(4)
    layer = build_mixer("gma", framework=framework, d_model=D_MODEL, num_heads=HEADS, num_components=K)
    x_np = _x(2, 9, seed=5)
    x = fw.array(x_np)
    moved = analysis.routing_stability(layer, x, 0.1, num_samples=2, seed=11)
    # By the definition: the same draws, the layer's own projections, TV per token, mean.
    rng = np.random.default_rng(11)
    clean = _manual_gammas(fw, layer, x)
    want = {"q": 0.0, "k": 0.0}
    for _ in range(2):
        noisy = _manual_gammas(fw, layer, fw.array((x_np + 0.1 * rng.standard_normal(x_np.shape)).astype(np.float32)))
        for name in want:
            want[name] = want[name] + 0.5 * np.abs(clean[name] - noisy[name]).sum(-1).mean((0, 1)) / 2
    for name in ("q", "k"):
        assert moved[name].shape == (HEADS,)
        np.testing.assert_allclose(moved[name], want[name], rtol=1e-9, atol=1e-12)
    again = analysis.routing_stability(layer, x, 0.1, num_samples=2, seed=11)
    np.testing.assert_array_equal(again["q"], moved["q"])
    other = analysis.routing_stability(layer, x, 0.1, num_samples=2, seed=12)
    assert np.abs(other["q"] - moved["q"]).max() > 0
    np.testing.assert_array_equal(analysis.routing_stability(layer, x, 0.0)["k"], 0.0)
    small, large = (analysis.routing_stability(layer, x, s, num_samples=4)["q"] for s in (0.01, 1.0))
    assert (small < large).all() and (small > 0).all()


def test_stability_skips_padding_and_checks_arguments():
    torch.manual_seed(6)
    layer = build_mixer("gma", framework="torch", d_model=D_MODEL, num_heads=HEADS, num_components=K)
    x = torch.from_numpy(_x(1, 10))
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 6:] = False
    masked = analysis.routing_stability(layer, x, 0.2, key_padding_mask=mask, seed=1)
    # The definition over the real tokens only (x' rounded to x's float32 after adding the noise).
    rng = np.random.default_rng(1)
    noisy = torch.from_numpy((x.double().numpy() + 0.2 * rng.standard_normal((1, 10, D_MODEL))).astype(np.float32))
    clean, moved = (analysis.capture_responsibilities(layer, t)[0]["q"] for t in (x, noisy))
    tv = 0.5 * np.abs(clean - moved).sum(-1)[0, :6].mean(0)
    np.testing.assert_allclose(masked["q"], tv, rtol=1e-12)
    with pytest.raises(ValueError, match="noise_scale"):
        analysis.routing_stability(layer, x, -1.0)
    with pytest.raises(TypeError, match="GaussianMixtureAttention"):
        analysis.routing_stability(build_mixer("linear", d_model=D_MODEL, num_heads=HEADS), x, 0.1)


def test_capture_mixer_inputs_feeds_stability_of_a_model_block():
    torch.manual_seed(7)
    model = build_model("gma", framework="torch", vocab_size=9, num_layers=2, d_model=D_MODEL, num_heads=HEADS,
                        num_components=K, causal=True)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 9, (1, 15)))
    inputs = analysis.capture_mixer_inputs(model, tokens)
    assert sorted(inputs) == [0, 1] and tuple(inputs[1].shape) == (1, 15, D_MODEL)
    direct = analysis.capture_responsibilities(model.blocks[1].mixer, inputs[1])[0]
    np.testing.assert_array_equal(direct["k"], analysis.capture_responsibilities(model, tokens)[1]["k"])
    assert (analysis.routing_stability(model.blocks[1].mixer, inputs[1], 0.05)["k"] > 0).all()


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def test_plots_write_pngs_with_the_text_on_the_axis(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(8)
    model = build_model("gma", framework="torch", vocab_size=256, num_layers=1, d_model=D_MODEL, num_heads=HEADS,
                        num_components=K, causal=True)
    text = "To be, or not\nto be"
    gammas = analysis.capture_responsibilities(model, torch.tensor([list(text.encode())]))[0]
    fig = analysis.plot_responsibilities(gammas["q"], text, head=1, path=str(tmp_path / "r.png"))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "".join(labels) == "To\u2423be,\u2423or\u2423not\u21b5to\u2423be"
    assert fig.axes[0].images[0].get_array().shape == (K, len(text))
    analysis.plot_component_usage(gammas["q"], path=str(tmp_path / "u.png"))
    analysis.plot_usage_matrix(gammas["k"], path=str(tmp_path / "m.png"))
    for name in ("r.png", "u.png", "m.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib_say_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        analysis.plot_usage_matrix(np.full((1, 2, 1, 3), 1 / 3))
