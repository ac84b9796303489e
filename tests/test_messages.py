"""Error messages name the real problem: mixed array libraries, the SDPA (B, H, N, D) layout, the
parameter whose K is off, inputs of the wrong framework for a module; and gmattn's public namespace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gmattn

from test_errors import args32 as arrays, call  # q, k, v, mu, omega, alpha of (B, N, H, K, D, Dv) below

B, N, H, K, D, Dv = 2, 10, 3, 4, 5, 6


@pytest.mark.parametrize("name", ["k", "v", "mu", "omega", "alpha"])
def test_torch_q_with_a_numpy_array_names_the_array_type(name):
    a = arrays()
    a[name] = a[name].numpy()
    with pytest.raises(TypeError, match=rf"'{name}' must be a torch\.Tensor \(like q.*got numpy\.ndarray"):
        call(a)


def test_numpy_mask_and_state_with_torch_q():
    a = arrays()
    with pytest.raises(TypeError, match=r"'key_padding_mask' must be a torch\.Tensor .*got numpy\.ndarray"):
        call(a, key_padding_mask=np.ones((B, N), dtype=bool))
    S0, z0 = np.zeros((B, H, K, Dv), np.float32), torch.zeros(B, H, K)
    with pytest.raises(TypeError, match=r"'initial_state\[0\] \(S\)' must be a torch\.Tensor .*got numpy\.ndarray"):
        call(a, initial_state=(S0, z0))


def test_numpy_q_with_a_torch_array_names_the_array_type():
    a = {name: t.numpy() for name, t in arrays().items()}
    a["k"] = torch.from_numpy(a["k"])
    with pytest.raises(TypeError, match=r"'k' must be a numpy\.ndarray \(like q.*got torch\.Tensor"):
        call(a)


def test_sdpa_layout_gets_a_layout_hint():
    """q, k, v as (B, H, N, D), the layout of scaled_dot_product_attention."""
    a = arrays()
    for name in ("q", "k", "v"):
        a[name] = a[name].transpose(1, 2).contiguous()
    with pytest.raises(ValueError, match=r"looks like the \(B, H, N, D\) layout of scaled_dot_product_attention"
                                         r".*\(B, N, H, D\).*transpose\(1, 2\)"):
        call(a)


def test_mu_heads_mismatch_without_the_layout_gets_no_layout_hint():
    with pytest.raises(ValueError, match=r"'mu' must have shape \(H, K, D\) with H=3") as info:
        call(arrays(mu=torch.zeros(2, K, D)))
    assert "scaled_dot_product_attention" not in str(info.value)


@pytest.mark.parametrize("odd,shape", [("mu", (H, K + 1, D)), ("omega", (H, K + 2, D)), ("alpha", (H, K + 1))])
def test_the_parameter_with_the_wrong_k_is_blamed(odd, shape):
    with pytest.raises(ValueError, match=rf"'{odd}' has K={shape[1]} components but \w+ and \w+ have K={K}"):
        call(arrays(**{odd: torch.zeros(shape)}))


def test_three_different_k_name_all_three():
    over = dict(mu=torch.zeros(H, 4, D), omega=torch.zeros(H, 5, D), alpha=torch.zeros(H, 6))
    with pytest.raises(ValueError, match=r"disagree on K.*'mu' has K=4, 'omega' has K=5, 'alpha' has K=6"):
        call(arrays(**over))


# ----------------------------------------------------------------------------------------------
# Modules: inputs of another framework say which framework the module expects
# ----------------------------------------------------------------------------------------------
CFG = dict(d_model=16, num_heads=2, causal=True, num_components=4)


def _torch_modules():
    cfg = gmattn.MixerConfig(kind="gma", **CFG)
    return {
        "GMAMixer": gmattn.build_mixer(cfg, framework="torch"),
        "SoftmaxAttention": gmattn.build_mixer(cfg.replace(kind="softmax"), framework="torch"),
        "MixerBlock": gmattn.build_block(cfg, framework="torch"),
    }


@pytest.mark.parametrize("module_name", ["GMAMixer", "SoftmaxAttention", "MixerBlock"])
def test_torch_module_with_numpy_input_says_torch(module_name):
    module = _torch_modules()[module_name]
    with pytest.raises(TypeError, match=rf"{module_name}: x must be a torch\.Tensor \(this is a PyTorch module: "
                                        r"convert the input with torch\.as_tensor.*got numpy\.ndarray"):
        module(np.zeros((1, 8, 16), np.float32))


def test_torch_layer_with_numpy_input_says_torch():
    from gmattn.torch import GaussianMixtureAttention

    with pytest.raises(TypeError, match=r"GaussianMixtureAttention: x must be a torch\.Tensor .*got numpy\.ndarray"):
        GaussianMixtureAttention(16, 2, 4)(np.zeros((1, 8, 16), np.float32))


def test_torch_model_with_numpy_tokens_says_torch():
    lm = gmattn.build_model(gmattn.MixerConfig(**CFG), framework="torch", vocab_size=50, num_layers=1)
    with pytest.raises(TypeError, match=r"SequenceModel: tokens must be a torch\.Tensor .*framework='mlx'.*"
                                        r"got numpy\.ndarray"):
        lm(np.zeros((1, 8), np.int64))


def test_models_with_the_other_frameworks_tokens_say_which_framework():
    mx = pytest.importorskip("mlx.core")
    cfg = gmattn.MixerConfig(**CFG)
    torch_lm = gmattn.build_model(cfg, framework="torch", vocab_size=50, num_layers=1)
    mlx_lm = gmattn.build_model(cfg, framework="mlx", vocab_size=50, num_layers=1)
    with pytest.raises(TypeError, match=r"tokens must be a torch\.Tensor \(this is a PyTorch module.*got mlx\.core\.array"):
        torch_lm(mx.zeros((1, 8), dtype=mx.int32))
    with pytest.raises(TypeError, match=r"tokens must be an mlx\.core\.array \(this is an MLX module.*"
                                        r"framework='torch'.*got torch\.Tensor"):
        mlx_lm(torch.zeros(1, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"tokens must be an mlx\.core\.array .*got numpy\.ndarray"):
        mlx_lm(np.zeros((1, 8), np.int32))
    for kind in ("gma", "linear"):
        mixer = gmattn.build_mixer(cfg.replace(kind=kind), framework="mlx")
        with pytest.raises(TypeError, match=r"x must be an mlx\.core\.array .*got torch\.Tensor"):
            mixer(torch.zeros(1, 8, 16))
    block = gmattn.build_block(cfg, framework="mlx")
    with pytest.raises(TypeError, match=r"MixerBlock: x must be an mlx\.core\.array .*got numpy\.ndarray"):
        block(np.zeros((1, 8, 16), np.float32))


def test_public_namespace_is_all():
    assert dir(gmattn) == sorted(gmattn.__all__)
    for name in gmattn.__all__:
        assert hasattr(gmattn, name), name
    for private in ("Any", "annotations", "_checks", "mixers"):
        assert private not in dir(gmattn)
