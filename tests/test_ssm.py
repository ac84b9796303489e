"""kind "ssm": the selective state-space mixer (Mamba-2 style) in PyTorch and MLX.

The chunked scan is judged against the step-by-step recurrence in float64, the whole mixer against
an independent float64 re-computation from its parameters (F.conv1d, a plain loop over tokens, the
pairwise sum for the bidirectional read). The behaviour every kind shares (masks, stepping with
holes, state shapes, gradients reaching every parameter) is parametrized in test_mixers.py.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from gmattn.mixers import MixerConfig, build_mixer, build_model  # noqa: E402
from gmattn.mixers.torch_mixers import (causal_conv, decayed_scan, selective_scan,  # noqa: E402
                                        selective_scan_sequential, ssm_scan)

HAS_MLX = importlib.util.find_spec("mlx") is not None
needs_mlx = pytest.mark.skipif(not HAS_MLX, reason="MLX is not installed")
D_MODEL, HEADS = 32, 2


def _scan_inputs(Bt=2, N=150, H=3, P=4, S=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bt, N, H, P, generator=g, dtype=dtype)
    dt = torch.rand(Bt, N, H, generator=g, dtype=dtype) * 0.5
    dt[0, 40:47] = 0.0  # masked tokens: no write, no decay
    A = -(0.5 + 4 * torch.rand(H, generator=g, dtype=dtype))
    B = torch.randn(Bt, N, S, generator=g, dtype=dtype)
    C = torch.randn(Bt, N, S, generator=g, dtype=dtype)
    h0 = torch.randn(Bt, H, P, S, generator=g, dtype=dtype)
    return x, dt, A, B, C, h0


def _cfg(causal, **kw):
    return MixerConfig(kind="ssm", d_model=D_MODEL, num_heads=HEADS, causal=causal, state_dim=8, **kw)


def _x(B, N, seed=0):
    return np.random.default_rng(seed).standard_normal((B, N, D_MODEL)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The scan
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("chunk", [64, 7, 2, 1, 256])
def test_chunked_scan_equals_sequential_recurrence_float64(chunk, diagonal):
    """chunk=2 gives 75 chunks, more than one group of the chunk-state scan (two levels)."""
    x, dt, A, B, C, h0 = _scan_inputs()
    y, h = selective_scan(x, dt, A, B, C, h0, diagonal=diagonal, chunk=chunk)
    y_ref, h_ref = selective_scan_sequential(x, dt, A, B, C, h0, diagonal=diagonal)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    y0, _ = selective_scan(x, dt, A, B, C, None, diagonal=diagonal, chunk=chunk)
    y0_ref, _ = selective_scan_sequential(x, dt, A, B, C, None, diagonal=diagonal)
    torch.testing.assert_close(y0, y0_ref, rtol=1e-12, atol=1e-12)
    assert (y - y0).abs().max() > 1e-3  # the initial state is read


def test_sequential_recurrence_is_the_documented_one():
    """One step by hand: h1 = exp(dt A) h0 + dt x B^T, y = h1 C (and exp(dt A) h0 C without the diagonal)."""
    x, dt, A, B, C, h0 = _scan_inputs(Bt=1, N=1, H=1, P=2, S=3)
    decay = torch.exp(dt[0, 0, 0] * A[0])
    h1 = decay * h0[0, 0] + dt[0, 0, 0] * torch.outer(x[0, 0, 0], B[0, 0])
    y, h = selective_scan_sequential(x, dt, A, B, C, h0)
    torch.testing.assert_close(h[0, 0], h1, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(y[0, 0, 0], h1 @ C[0, 0], rtol=1e-14, atol=1e-14)
    y_strict, _ = selective_scan_sequential(x, dt, A, B, C, h0, diagonal=False)
    torch.testing.assert_close(y_strict[0, 0, 0], decay * h0[0, 0] @ C[0, 0], rtol=1e-14, atol=1e-14)


def test_decayed_scan_multi_level_equals_loop():
    g = -torch.rand(2, 3, 300, dtype=torch.float64)
    s = torch.randn(2, 3, 300, 5, dtype=torch.float64)
    h0 = torch.randn(2, 3, 5, dtype=torch.float64)
    h, ref = h0, []
    for c in range(300):
        h = torch.exp(g[..., c, None]) * h + s[..., c, :]
        ref.append(h)
    ref = torch.stack(ref, -2)
    for group in (4, 17, 300):  # three levels, two levels, one
        torch.testing.assert_close(decayed_scan(g, s, h0, group=group), ref, rtol=1e-12, atol=1e-12)


def test_chunked_scan_gradients_equal_sequential_float64():
    inputs = [t.requires_grad_(True) for t in _scan_inputs(N=37, seed=1)]
    weights = torch.randn(2, 37, 3, 4, dtype=torch.float64)
    grads = []
    for scan in (lambda *a: selective_scan(*a, chunk=8), selective_scan_sequential):
        y, h = scan(*inputs)
        loss = (y * weights).sum() + h.square().sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for name, g, g_ref in zip(("x", "dt", "A", "B", "C", "h0"), *grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=name)
        assert g.abs().sum() > 0, name


def test_chunked_scan_gradcheck():
    args = [t.requires_grad_(True) for t in _scan_inputs(Bt=1, N=9, H=2, P=2, S=3, seed=2)]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, chunk=4), args)


def test_bidirectional_read_equals_pairwise_sum_float64():
    """y[i] = sum_j (C[i] . B[j]) exp(A * sum of dt over the steps between) dt[j] x[j], every j once:
    the steps j+1..i for j <= i, the steps i..j-1 for j > i."""
    x, dt, A, B, C, _ = _scan_inputs(Bt=1, N=80, seed=3)
    y, _ = ssm_scan(x, dt, A, B, C, causal=False)
    cum = torch.cat([torch.zeros(1, 1, 3, dtype=x.dtype), dt.cumsum(1)], 1)  # cum[t] = dt[0] + ... + dt[t-1]
    ref = torch.zeros_like(y)
    N = x.shape[1]
    for i in range(N):
        for j in range(N):
            steps = cum[0, i + 1] - cum[0, j + 1] if j <= i else cum[0, j] - cum[0, i]
            weight = (C[0, i] @ B[0, j]) * torch.exp(A * steps) * dt[0, j]  # (H,)
            ref[0, i] += weight[:, None] * x[0, j]
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    y_seq, _ = ssm_scan(x, dt, A, B, C, causal=False, scan=selective_scan_sequential)
    torch.testing.assert_close(y_seq, ref, rtol=1e-10, atol=1e-10)


def test_causal_conv_is_conv1d_with_left_padding():
    u = torch.randn(2, 11, 6, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    out, tail = causal_conv(u, torch.zeros(2, 3, 6, dtype=torch.float64), weight, bias)
    ref = F.conv1d(u.transpose(1, 2), weight.unsqueeze(1), bias, padding=3, groups=6)[..., :11].transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tail, u[:, -3:])


@needs_mlx
@pytest.mark.parametrize("causal", [True, False])
def test_mlx_scan_equals_torch_sequential(causal):
    import mlx.core as mx

    from gmattn.mixers import mlx_mixers

    x, dt, A, B, C, h0 = _scan_inputs(seed=4)
    ref_y, ref_h = ssm_scan(x, dt, A, B, C, causal, h0, scan=selective_scan_sequential)
    y, h = mlx_mixers.ssm_scan(*(mx.array(t.float().numpy()) for t in (x, dt, A, B, C)), causal, mx.array(h0.float().numpy()))
    np.testing.assert_allclose(np.array(y), ref_y.numpy(), rtol=0, atol=2e-5 * ref_y.abs().max().item())
    np.testing.assert_allclose(np.array(h), ref_h.numpy(), rtol=0, atol=2e-5 * ref_h.abs().max().item())
    g = -mx.random.uniform(shape=(2, 3, 300))
    s = mx.random.normal((2, 3, 300, 5))
    h0_ = mx.random.normal((2, 3, 5))
    ref = decayed_scan(*(torch.from_numpy(np.array(t)).double() for t in (g, s, h0_)), group=4)
    np.testing.assert_allclose(np.array(mlx_mixers.decayed_scan(g, s, h0_, group=4)), ref.numpy(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The mixer
# ----------------------------------------------------------------------------------------------
def _mixer_reference(m, x, mask=None):
    """The torch mixer's forward re-computed in float64 from its parameters, one token at a time."""
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    x = x.double()
    B, N, _ = x.shape
    H, P, S, W = m.num_heads, m.head_dim, m.state_dim, m.conv_width
    lin = lambda name, t: F.linear(t, p[name + ".weight"], p.get(name + ".bias"))  # noqa: E731
    real = torch.ones(B, N, dtype=torch.float64) if mask is None else mask.double()
    u = torch.cat([lin("x_proj", x), lin("B_proj", x), lin("C_proj", x)], -1) * real[..., None]
    u = F.conv1d(u.transpose(1, 2), p["conv_weight"].unsqueeze(1), p["conv_bias"], padding=W - 1,
                 groups=u.shape[-1])[..., :N].transpose(1, 2)
    u = F.silu(u)
    xs, Bs, Cs = u[..., :H * P].reshape(B, N, H, P), u[..., H * P:H * P + S], u[..., H * P + S:]
    dt = F.softplus(lin("dt_proj", x) + p["dt_bias"]) * real[..., None]
    A = -torch.exp(p["A_log"])
    y = torch.zeros(B, N, H, P, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                js = range(N) if not m.causal else range(i + 1)
                for j in js:
                    lo, hi = (j + 1, i + 1) if j <= i else (i, j)
                    decay = torch.exp(A[h] * dt[b, lo:hi, h].sum())
                    y[b, i, h] += (Cs[b, i] @ Bs[b, j]) * decay * dt[b, j, h] * xs[b, j, h]
    y = (y + p["D"][:, None] * xs).reshape(B, N, H * P)
    g = y * F.silu(lin("z_proj", x))
    g = g / torch.sqrt(g.square().mean(-1, keepdim=True) + 1e-5) * p["norm_weight"]
    return lin("out_proj", g)


@pytest.mark.parametrize("causal", [True, False])
def test_mixer_equals_independent_float64_computation(causal):
    torch.manual_seed(0)
    m = build_mixer(_cfg(causal, bias=True, head_dim=4), framework="torch").double()
    x = torch.from_numpy(_x(2, 21, seed=1)).double()
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, 5] = mask[1, 15:] = False
    y = m(x, key_padding_mask=mask)
    ref = _mixer_reference(m, x, mask)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("framework", ["torch", pytest.param("mlx", marks=needs_mlx)])
def test_prefix_of_output_independent_of_later_inputs(framework):
    m = build_mixer(_cfg(True), framework=framework)
    to, back = _converters(framework)
    x = _x(2, 150, seed=2)  # three chunks
    y = back(m(to(x)))
    for i in (0, 63, 64, 100):
        x2 = x.copy()
        x2[:, i + 1:] = _x(2, 150 - i - 1, seed=3 + i) * 5
        y2 = back(m(to(x2)))
        np.testing.assert_array_equal(y2[:, :i + 1], y[:, :i + 1])
        assert np.abs(y2[:, i + 1:] - y[:, i + 1:]).max() > 1e-3
    bidirectional = build_mixer(_cfg(False), framework=framework)
    x2 = x.copy()
    x2[:, 140:] += 1.0
    assert np.abs(back(bidirectional(to(x2)))[:, :10] - back(bidirectional(to(x)))[:, :10]).max() > 1e-6


def _converters(framework):
    if framework == "torch":
        return (lambda a: torch.from_numpy(np.ascontiguousarray(a))), (lambda t: t.detach().numpy())
    import mlx.core as mx

    return (lambda a: mx.array(np.ascontiguousarray(a))), np.array


@pytest.mark.parametrize("conv_width", [4, 0, 1])
@pytest.mark.parametrize("framework", ["torch", pytest.param("mlx", marks=needs_mlx)])
def test_split_resume_equals_one_call(framework, conv_width):
    """Two (or more) calls handing the state across equal one call, for splits inside the first
    chunk, at a chunk boundary, and shorter than the convolution's window."""
    m = build_mixer(_cfg(True, conv_width=conv_width), framework=framework)
    to, back = _converters(framework)
    x = _x(2, 140, seed=4)
    mask = np.ones((2, 140), dtype=bool)
    mask[0, 3] = mask[1, 70:75] = False
    full, (h_full, tail_full) = m(to(x), key_padding_mask=to(mask), return_state=True)
    assert tuple(tail_full.shape) == (2, max(conv_width - 1, 0), HEADS * 16 + 2 * 8)
    for cuts in ([1, 2, 64], [64], [5, 6, 7, 100], [139]):
        state, outs = None, []
        for lo, hi in zip([0] + cuts, cuts + [140]):
            y, state = m(to(x[:, lo:hi]), key_padding_mask=to(mask[:, lo:hi]), state=state, return_state=True)
            outs.append(back(y))
        np.testing.assert_allclose(np.concatenate(outs, 1), back(full), rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(back(state[0]), back(h_full), rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(back(state[1]), back(tail_full), rtol=1e-6, atol=1e-7)
    assert np.abs(back(h_full)).max() > 1e-3


@needs_mlx
@pytest.mark.parametrize("causal", [True, False])
def test_weight_exchange_torch_mlx_within_1e5(causal):
    import mlx.core as mx

    torch.manual_seed(5)
    mx.random.seed(6)
    cfg = _cfg(causal, bias=True)
    t = build_mixer(cfg, framework="torch")
    m = build_mixer(cfg, framework="mlx").import_weights(t.export_weights())
    assert sorted(t.export_weights()) == sorted(m.export_weights())
    x = _x(2, 150, seed=7)
    mask = np.ones((2, 150), dtype=bool)
    mask[1, 90:] = False
    with torch.no_grad():
        yt, st = t(torch.from_numpy(x), key_padding_mask=torch.from_numpy(mask), return_state=True)
    ym, sm = m(mx.array(x), key_padding_mask=mx.array(mask), return_state=True)
    np.testing.assert_allclose(np.array(ym), yt.numpy(), rtol=0, atol=1e-5)
    for a, b in zip(sm, st):
        np.testing.assert_allclose(np.array(a), b.numpy(), rtol=0, atol=1e-5)
    assert np.abs(yt.numpy()).max() > 1e-2
    back = build_mixer(cfg, framework="torch").import_weights(m.export_weights())
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.from_numpy(x)).numpy(), t(torch.from_numpy(x)).numpy())


@needs_mlx
def test_mlx_gradients_equal_torch_gradients():
    import mlx.core as mx
    import mlx.nn as mnn
    from mlx.utils import tree_flatten

    torch.manual_seed(8)
    cfg = _cfg(False, bias=True)
    t = build_mixer(cfg, framework="torch")
    m = build_mixer(cfg, framework="mlx").import_weights(t.export_weights())
    x = _x(2, 70, seed=9)
    xt = torch.from_numpy(x).requires_grad_(True)
    t(xt).square().mean().backward()

    def loss(params, x):
        m.update(params)
        return (m(x) ** 2).mean()

    grads, gx = mx.value_and_grad(loss, argnums=(0, 1))(m.trainable_parameters(), mx.array(x))[1]
    np.testing.assert_allclose(np.array(gx), xt.grad.numpy(), rtol=0, atol=1e-6)
    for name, g in tree_flatten(grads):
        ref = dict(t.named_parameters())[name].grad.numpy()
        np.testing.assert_allclose(np.array(g), ref, rtol=0, atol=2e-5 * max(1.0, np.abs(ref).max()), err_msg=name)
    assert isinstance(m, mnn.Module)


@pytest.mark.parametrize("framework", ["torch", pytest.param("mlx", marks=needs_mlx)])
def test_lm_with_ssm_blocks_trains(framework):
    kw = dict(vocab_size=13, num_layers=2, d_model=D_MODEL, num_heads=HEADS, causal=True, state_dim=8)
    tokens = np.random.default_rng(0).integers(0, 13, (4, 33))
    if framework == "torch":
        torch.manual_seed(0)
        model = build_model("ssm", framework="torch", **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        inputs, targets = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])
        losses = []
        for _ in range(5):
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    else:
        import mlx.core as mx
        import mlx.nn as mnn
        import mlx.optimizers as optim

        mx.random.seed(0)
        model = build_model("ssm", framework="mlx", **kw)
        opt = optim.AdamW(learning_rate=3e-3)
        inputs, targets = mx.array(tokens[:, :-1].astype(np.int32)), mx.array(tokens[:, 1:].astype(np.int32))

        def loss_fn(model):
            return mnn.losses.cross_entropy(model(inputs), targets).mean()

        step = mnn.value_and_grad(model, loss_fn)
        losses = []
        for _ in range(5):
            loss, grads = step(model)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
            losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses


def test_config_checks_and_no_convolution():
    with pytest.raises(ValueError, match="conv_width"):
        MixerConfig(kind="ssm", conv_width=-1)
    with pytest.raises(ValueError, match="state_dim"):
        MixerConfig(kind="ssm", state_dim=0)
    m = build_mixer(_cfg(True, conv_width=0), framework="torch")
    assert "conv_weight" not in m.export_weights() and m.export_weights()["A_log"].shape == (HEADS,)
    A = -np.exp(m.export_weights()["A_log"])
    step = np.log1p(np.exp(m.export_weights()["dt_bias"]))
    assert (A <= -1).all() and (A >= -16).all() and (step >= 1e-3 * 0.999).all() and (step <= 0.1 * 1.001).all()
