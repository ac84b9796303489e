"""One SequenceMixer interface over mixer kinds and frameworks.

    from gmattn.mixers import MixerConfig, build_mixer
    config = MixerConfig(kind="gma", d_model=256, num_heads=4, causal=True, num_components=32)
    mixer = build_mixer(config, framework="torch")        # or framework="mlx"
    y = mixer(x)                                          # x: (B, N, d_model)
    y, state = mixer(x[:, :10], return_state=True)        # continue a sequence:
    y2, state = mixer(x[:, 10:], state=state, return_state=True)

    twin = build_mixer(config, framework="mlx").import_weights(mixer.export_weights())

Kinds: "gma" (this library), "softmax" (SDPA), "linear" (elu+1, Katharopoulos et al. 2020),
"performer" (FAVOR+, Choromanski et al. 2021), "ssm" (a Mamba-2 style selective state-space model).
Swap the kind by one word; `build_block` and
`build_model` give a pre-norm residual MixerBlock and a SequenceModel (LM or classification head)
around any of them. Importing this package imports neither torch nor MLX.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Dict, Optional, Union

from .config import CAUSAL_STATE, FEATURE_MAPS, KINDS, MixerConfig
from .weights import export_weights, import_weights, read_weights, save_weights

FRAMEWORKS = ("torch", "mlx")

__all__ = [
    "MixerConfig", "KINDS", "FRAMEWORKS", "CAUSAL_STATE", "FEATURE_MAPS", "build_mixer", "build_block", "build_model",
    "export_weights", "import_weights", "save_weights", "read_weights", "available_frameworks", "available_kinds",
]


def _resolve(config: Union[MixerConfig, Dict[str, Any], str, None], overrides: Dict[str, Any]) -> MixerConfig:
    if config is None:
        return MixerConfig(**overrides)
    if isinstance(config, str):
        return MixerConfig(kind=config, **overrides)
    if isinstance(config, dict):
        return MixerConfig.from_dict({**config, **overrides})
    if isinstance(config, MixerConfig):
        return config.replace(**overrides) if overrides else config
    raise TypeError(f"expected a MixerConfig, a dict or a kind name, got {type(config).__name__}")


def _backend(framework: str, what: str):
    if framework == "torch":
        from . import blocks_torch, torch_mixers

        return torch_mixers, blocks_torch
    if framework == "mlx":
        try:
            from . import blocks_mlx, mlx_mixers
        except ImportError as exc:
            raise ImportError(
                f"{what}(framework='mlx') needs MLX: pip install 'mlx' (macOS) or 'mlx[cpu]' (Linux) ({exc})"
            ) from exc
        return mlx_mixers, blocks_mlx
    raise ValueError(f"{what}: framework must be one of {FRAMEWORKS}, got {framework!r}")


def build_mixer(config: Union[MixerConfig, Dict[str, Any], str, None] = None, framework: str = "torch",
                **overrides):
    """A mixer module of `framework` ("torch": torch.nn.Module, "mlx": mlx.nn.Module).

    `config` is a MixerConfig, its dict, or a kind name; keyword arguments override its fields
    (`build_mixer("linear", d_model=128, num_heads=2)`). Every mixer is called as
    `mixer(x, key_padding_mask=None, state=None, return_state=False)` and has
    `export_weights()` / `import_weights(weights)`.
    """
    cfg = _resolve(config, overrides)
    mixers, _ = _backend(framework, "build_mixer")
    return mixers.build(cfg)


def build_block(config: Union[MixerConfig, Dict[str, Any], str, None] = None, framework: str = "torch",
                mlp_ratio: float = 4.0, dropout: float = 0.0, **overrides):
    """A pre-norm MixerBlock (mixer + MLP, residuals) of `framework` around the configured mixer."""
    cfg = _resolve(config, overrides)
    _, blocks = _backend(framework, "build_block")
    return blocks.MixerBlock(cfg, mlp_ratio=mlp_ratio, dropout=dropout)


def build_model(config: Union[MixerConfig, Dict[str, Any], str, None] = None, framework: str = "torch", *,
                vocab_size: int, num_layers: int = 2, head: str = "lm", num_classes: Optional[int] = None,
                pooling: str = "mean", max_len: Optional[int] = None, tie_embeddings: bool = False,
                mlp_ratio: float = 4.0, dropout: float = 0.0, **overrides):
    """A SequenceModel of `framework`: embedding, `num_layers` MixerBlocks, and an "lm" or
    "classification" head (pooling "mean" or "last", both respecting key_padding_mask)."""
    cfg = _resolve(config, overrides)
    _, blocks = _backend(framework, "build_model")
    return blocks.SequenceModel(cfg, vocab_size=vocab_size, num_layers=num_layers, head=head,
                                num_classes=num_classes, pooling=pooling, max_len=max_len,
                                tie_embeddings=tie_embeddings, mlp_ratio=mlp_ratio, dropout=dropout)


def available_frameworks():
    """The frameworks installed here, of FRAMEWORKS."""
    return tuple(f for f in FRAMEWORKS if importlib.util.find_spec(f) is not None)


def available_kinds(framework: str):
    """The kinds `build_mixer` can build for `framework` here: all of them where it is installed."""
    return KINDS if framework in available_frameworks() else ()
