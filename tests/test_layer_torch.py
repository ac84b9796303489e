"""gmattn.torch.GaussianMixtureAttention: the layer around the op."""

from __future__ import annotations

import math

import pytest
import torch

import gmattn
from gmattn import reference
from gmattn.torch import GaussianMixtureAttention, initial_variance


def test_parameters_and_shapes():
    layer = GaussianMixtureAttention(48, num_heads=4, num_components=8, routing_dim=6)
    assert layer.mu.shape == (4, 8, 6) and layer.omega.shape == (4, 8, 6) and layer.alpha.shape == (4, 8)
    assert layer.q_proj.out_features == 24 and layer.v_proj.out_features == 48
    y = layer(torch.randn(3, 17, 48))
    assert y.shape == (3, 17, 48)


def test_initialisation_matches_documented_rule():
    torch.manual_seed(0)
    layer = GaussianMixtureAttention(64, 2, 512)
    sigma2 = torch.nn.functional.softplus(layer.omega) + layer.sigma_eps
    torch.testing.assert_close(sigma2, torch.full_like(sigma2, initial_variance(1 / 3, 32)))
    assert abs(layer.mu.std().item() - math.sqrt(1 / 3)) < 0.02
    assert torch.equal(layer.alpha, torch.zeros_like(layer.alpha))
    # routing at init is soft but informative: neither uniform nor one-hot
    x = torch.nn.functional.layer_norm(torch.randn(4, 64, 64), (64,))
    q = layer.q_proj(x).view(4, 64, 2, 32)
    gamma = reference.responsibilities(q, layer.mu, layer.omega, layer.alpha)
    entropy = -(gamma * gamma.clamp_min(1e-30).log()).sum(-1).mean().item()
    assert 0.3 * math.log(512) < entropy < 0.999 * math.log(512)


def test_layer_matches_reference_math():
    torch.manual_seed(1)
    layer = GaussianMixtureAttention(16, 2, 4, causal=True).double()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    q = layer.q_proj(x).view(2, 30, 2, 8)
    k = layer.k_proj(x).view(2, 30, 2, 8)
    v = layer.v_proj(x).view(2, 30, 2, 8)
    want = layer.out_proj(reference.naive_gma(q, k, v, layer.mu, layer.omega, layer.alpha, causal=True)
                          .reshape(2, 30, 16))
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-12)


def test_streaming_with_state_equals_full_run():
    torch.manual_seed(2)
    layer = GaussianMixtureAttention(24, 3, 5, causal=True).double()
    x = torch.randn(2, 41, 24, dtype=torch.float64)
    full, (S, z) = layer(x, return_state=True)
    state, pieces = None, []
    for start, stop in [(0, 1), (1, 17), (17, 18), (18, 41)]:
        y, state = layer(x[:, start:stop], state=state, return_state=True)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[0], S)
    torch.testing.assert_close(state[1], z)
    assert S.shape == (2, 3, 5, 8) and z.shape == (2, 3, 5)


def test_key_padding_mask_ignores_padding():
    torch.manual_seed(3)
    layer = GaussianMixtureAttention(16, 2, 4)
    x = torch.randn(1, 12, 16)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, 8:] = False
    y = layer(x, key_padding_mask=mask)
    x2 = x.clone()
    x2[:, 8:] = 100.0  # garbage in the padding changes nothing at real positions
    y2 = layer(x2, key_padding_mask=mask)
    torch.testing.assert_close(y[:, :8], y2[:, :8])
    torch.testing.assert_close(y[:, :8], layer(x[:, :8]))


def test_training_lowers_loss():
    torch.manual_seed(4)
    layer = GaussianMixtureAttention(16, 2, 8, causal=True)
    head = torch.nn.Linear(16, 16)
    opt = torch.optim.Adam(list(layer.parameters()) + list(head.parameters()), lr=1e-2)
    x = torch.randn(8, 32, 16)
    target = torch.roll(x, 1, dims=1)  # copy the previous token: needs mixing along the sequence
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(head(layer(x)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses[::10]
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_bf16_autocast_training_step():
    torch.manual_seed(5)
    layer = GaussianMixtureAttention(32, 4, 8, causal=True)
    x = torch.randn(2, 40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert layer.mu.grad.dtype == torch.float32 and torch.isfinite(layer.mu.grad).all()


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        GaussianMixtureAttention(10, 3, 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        GaussianMixtureAttention(16, 2, 0)
    for kw in (dict(routing_dim=0), dict(head_dim=0), dict(head_dim=-3)):
        with pytest.raises(ValueError, match=r"head_dim and routing_dim must be >= 1"):
            GaussianMixtureAttention(16, 2, 4, **kw)
    layer = GaussianMixtureAttention(16, 2, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, d_model=16\)"):
        layer(torch.randn(2, 5, 8))


def test_op_reexported_from_torch_namespace():
    assert gmattn.torch.gma_attention is not None
    p = [torch.randn(1, 5, 1, 2), torch.randn(1, 5, 1, 2), torch.randn(1, 5, 1, 3), torch.randn(1, 2, 2),
         torch.randn(1, 2, 2), torch.randn(1, 2)]
    torch.testing.assert_close(gmattn.torch.gma_attention(*p), gmattn.gma_attention(*p))
