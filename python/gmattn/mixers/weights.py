"""Framework-neutral weight exchange: a flat dict of NumPy arrays.

Names are the dotted parameter paths, identical in torch and MLX because the mixers, blocks and
models of both frameworks have the same structure and attribute names, and both store linear
weights as (out_features, in_features):

    q_proj.weight, q_proj.bias, k_proj.*, v_proj.*, out_proj.*       gma, softmax, linear, performer
    mu, omega, alpha                                                   gma
    features                                                           performer (the random features)
    z_proj.*, x_proj.*, B_proj.*, C_proj.*, dt_proj.*, out_proj.*,     ssm (conv_weight (C, W) is PyTorch
      conv_weight, conv_bias, dt_bias, A_log, D, norm_weight              Conv1d's (C, 1, W) without the 1)
    norm1.weight, mixer.q_proj.weight, fc1.weight, ...                 MixerBlock
    embed.weight, pos_embed.weight, blocks.0.mixer.mu, head.weight     SequenceModel

Arrays are float32 (float64 parameters stay float64; bfloat16/float16 become float32).
"""

from __future__ import annotations

import sys
from typing import Dict, Mapping

import numpy as np

Weights = Dict[str, np.ndarray]


def _is_torch(module) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(module, torch.nn.Module)


def _is_mlx(module) -> bool:
    nn = sys.modules.get("mlx.nn")
    return nn is not None and isinstance(module, nn.Module)


def _to_numpy_dtype(array: np.ndarray) -> np.ndarray:
    return array if array.dtype == np.float64 else array.astype(np.float32, copy=False)


def export_weights(module) -> Weights:
    """All parameters and persistent buffers of a torch or MLX module as {name: np.ndarray}."""
    if _is_torch(module):
        import torch

        out = {}
        for name, tensor in module.state_dict().items():
            t = tensor.detach().cpu()
            if t.dtype in (torch.bfloat16, torch.float16):
                t = t.float()
            out[name] = _to_numpy_dtype(t.numpy().copy())
        return out
    if _is_mlx(module):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        out = {}
        for name, array in tree_flatten(module.parameters()):
            if array.dtype in (mx.bfloat16, mx.float16):
                array = array.astype(mx.float32)
            out[name] = _to_numpy_dtype(np.array(array))
        return out
    raise TypeError(f"export_weights: expected a torch.nn.Module or mlx.nn.Module, got {type(module).__name__}")


def _check_names(module_name: str, expected: Mapping[str, tuple], weights: Mapping[str, np.ndarray],
                 strict: bool) -> None:
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if strict and (missing or unexpected):
        raise KeyError(f"import_weights({module_name}): missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        if name in weights and tuple(np.shape(weights[name])) != tuple(shape):
            raise ValueError(
                f"import_weights({module_name}): '{name}' has shape {tuple(np.shape(weights[name]))}, "
                f"the module expects {tuple(shape)}"
            )


def import_weights(module, weights: Mapping[str, np.ndarray], strict: bool = True):
    """Load {name: array} (from `export_weights` of either framework) into a torch or MLX module.

    With strict=True the names must match exactly; shapes must always match. Values are cast to
    each parameter's dtype and device. Returns the module.
    """
    kind = type(module).__name__
    if _is_torch(module):
        import torch

        state = module.state_dict()
        _check_names(kind, {k: tuple(v.shape) for k, v in state.items()}, weights, strict)
        with torch.no_grad():
            for name, target in state.items():
                if name in weights:
                    target.copy_(torch.as_tensor(np.asarray(weights[name])))
        return module
    if _is_mlx(module):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        params = dict(tree_flatten(module.parameters()))
        _check_names(kind, {k: tuple(v.shape) for k, v in params.items()}, weights, strict)
        pairs = [(k, mx.array(np.asarray(weights[k])).astype(params[k].dtype)) for k in params if k in weights]
        import mlx.nn as nn

        nn.Module.load_weights(module, pairs, strict=False)
        mx.eval(module.parameters())
        return module
    raise TypeError(f"import_weights: expected a torch.nn.Module or mlx.nn.Module, got {type(module).__name__}")


def save_weights(path: str, weights: Mapping[str, np.ndarray]) -> None:
    """Write exchanged weights to an .npz file."""
    np.savez(path, **{k: np.asarray(v) for k, v in weights.items()})


def read_weights(path: str) -> Weights:
    """Read an .npz written by `save_weights`."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
