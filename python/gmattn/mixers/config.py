"""MixerConfig: one framework-neutral description of a sequence mixer."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional

KINDS = ("gma", "softmax", "linear", "performer", "ssm")
"""Mixer kinds `build_mixer` knows, in both frameworks."""

CAUSAL_STATE = {
    "gma": "(S (B, H, K, Dv), z (B, H, K)): the mixture's running sums, float32",
    "linear": "(S (B, H, D, Dv), z (B, H, D)): running sums of phi(k) v^T and phi(k), float32",
    "performer": "(S (B, H, M, Dv), z (B, H, M)): running sums over the M random features, float32",
    "softmax": "(k (B, H, T, D), v (B, H, T, Dv), mask (B, T) bool): the KV cache of the T tokens seen",
    "ssm": "(h (B, H, P, S), conv (B, W - 1, H P + 2 S)): the scan's state (P = head_dim, S = state_dim) and the "
           "last W - 1 inputs of the short convolution (W = conv_width), float32",
}
"""What `mixer(x, state=..., return_state=True)` carries for each kind."""

FEATURE_MAPS = ("elu+1", "relu")


@dataclass
class MixerConfig:
    """Framework-neutral configuration of a sequence mixer (x: (B, N, d_model) -> (B, N, d_model)).

    Common fields:
        kind: one of KINDS: "gma", "softmax", "linear", "performer", "ssm".
        d_model: model width.
        num_heads: H.
        head_dim: per-head width (query/key and value); default d_model // num_heads.
        causal: position i reads only positions j <= i.
        bias: bias in the q/k/v/out projections.
        eps: added to the read denominator of the normalised kinds (gma, linear, performer).

    gma:
        num_components: K, mixture components (memory slots) per head.
        routing_dim: query/key width D per head (default head_dim).
        sigma_eps: floor of the component variances.

    performer (FAVOR+, Choromanski et al. 2021):
        num_features: M positive orthogonal random features per head (default 2 * head_dim).
        redraw: draw fresh features at every forward call in training mode (never while a
            state is passed, which would mix two feature sets). The features are a buffer that
            `export_weights` includes, so exchanged mixers agree exactly until the next redraw.
        seed: seed of the feature draw (NumPy generator; None = fresh entropy). The same seed
            gives the same features in torch and MLX.

    linear (Katharopoulos et al. 2020):
        feature_map: "elu+1" (the paper's) or "relu".

    ssm (a Mamba-2 style selective state-space model; head_dim is its per-head width P):
        state_dim: S, the state's size per head and channel (the B and C projections' width).
        conv_width: W, taps of the causal depthwise convolution before the scan (0: none).
    """

    kind: str = "gma"
    d_model: int = 256
    num_heads: int = 4
    head_dim: Optional[int] = None
    causal: bool = False
    bias: bool = False
    eps: float = 1e-6
    # gma
    num_components: int = 32
    routing_dim: Optional[int] = None
    sigma_eps: float = 1e-4
    # performer
    num_features: Optional[int] = None
    redraw: bool = False
    seed: Optional[int] = None
    # linear
    feature_map: str = "elu+1"
    # ssm
    state_dim: int = 64
    conv_width: int = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"MixerConfig: kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("d_model", "num_heads", "num_components", "state_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MixerConfig: {name} must be a positive int, got {value!r}")
        for name in ("head_dim", "routing_dim", "num_features"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MixerConfig: {name} must be a positive int or None, got {value!r}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"MixerConfig: d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly"
            )
        if not isinstance(self.conv_width, int) or self.conv_width < 0:
            raise ValueError(f"MixerConfig: conv_width must be an int >= 0 (0: no convolution), got {self.conv_width!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"MixerConfig: feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if not self.eps > 0 or not self.sigma_eps > 0:
            raise ValueError(f"MixerConfig: eps and sigma_eps must be > 0, got {self.eps}, {self.sigma_eps}")

    # Resolved sizes -----------------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def resolved_routing_dim(self) -> int:
        return self.routing_dim if self.routing_dim is not None else self.resolved_head_dim

    @property
    def resolved_num_features(self) -> int:
        return self.num_features if self.num_features is not None else 2 * self.resolved_head_dim

    # Serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "MixerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MixerConfig.from_dict: unknown fields {unknown}; known are {sorted(known)}")
        return cls(**data)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "MixerConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "MixerConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
