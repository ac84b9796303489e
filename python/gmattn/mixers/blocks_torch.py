"""MixerBlock and SequenceModel in PyTorch: swap the mixer by one word (config.kind)."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_model_args as _check_model_args
from .config import MixerConfig
from .torch_mixers import _Exchange, build


class MixerBlock(_Exchange, nn.Module):
    """Pre-norm residual block: x + mixer(norm1(x)), then x + fc2(gelu(fc1(norm2(x)))).

    forward(x, key_padding_mask=None, state=None, return_state=False) follows the mixer's calling
    convention; the state is the mixer's.
    """

    def __init__(self, config: MixerConfig, mlp_ratio: float = 4.0, dropout: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        d = config.d_model
        hidden = int(round(mlp_ratio * d))
        self.config = config
        self.norm1 = nn.LayerNorm(d, eps=norm_eps)
        self.mixer = build(config)
        self.norm2 = nn.LayerNorm(d, eps=norm_eps)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, state=None, return_state: bool = False):
        h = self.mixer(self.norm1(x), key_padding_mask=key_padding_mask, state=state, return_state=return_state)
        if return_state:
            h, state = h
        x = x + self.drop(h)
        x = x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))
        return (x, state) if return_state else x


class SequenceModel(_Exchange, nn.Module):
    """Token model: embedding (+ learned positions if max_len), MixerBlocks, final norm, head.

    Args:
        config: the mixer of every block (kind, width, heads, causal, ...).
        vocab_size: embedding rows.
        num_layers: number of MixerBlocks.
        head: "lm" -> logits (B, N, vocab_size); "classification" -> logits (B, num_classes).
        num_classes: classes of the classification head.
        pooling: "mean" (over real tokens, per key_padding_mask) or "last" (last real token).
        max_len: learned absolute positions up to max_len (None: no positional embedding).
        tie_embeddings: the LM head reuses the embedding matrix.

    forward(tokens (B, N) int, key_padding_mask=None, state=None, return_state=False). With the
    "lm" head, state = (position offset, [state of each block]) continues a sequence.
    """

    def __init__(self, config: MixerConfig, vocab_size: int, num_layers: int = 2, head: str = "lm",
                 num_classes: Optional[int] = None, pooling: str = "mean", max_len: Optional[int] = None,
                 tie_embeddings: bool = False, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        _check_model_args(head, num_classes, pooling, tie_embeddings)
        d = config.d_model
        self.config, self.head_kind, self.pooling, self.tie_embeddings = config, head, pooling, tie_embeddings
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d)
        self.pos_embed = nn.Embedding(max_len, d) if max_len else None
        self.blocks = nn.ModuleList(MixerBlock(config, mlp_ratio, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d)
        if head == "lm":
            self.head = None if tie_embeddings else nn.Linear(d, vocab_size, bias=False)
        else:
            self.head = nn.Linear(d, num_classes)

    def forward(self, tokens: Tensor, key_padding_mask: Optional[Tensor] = None, state=None,
                return_state: bool = False):
        if (state is not None or return_state) and self.head_kind != "lm":
            raise ValueError("SequenceModel: state is only carried with the 'lm' head")
        B, N = tokens.shape
        offset, layer_states = (0, [None] * len(self.blocks)) if state is None else state
        x = self.embed(tokens)
        if self.pos_embed is not None:
            if offset + N > self.max_len:
                raise ValueError(f"SequenceModel: positions up to {offset + N} exceed max_len={self.max_len}")
            x = x + self.pos_embed(torch.arange(offset, offset + N, device=tokens.device))
        new_states: List = []
        for block, s in zip(self.blocks, layer_states):
            if return_state:
                x, s = block(x, key_padding_mask=key_padding_mask, state=s, return_state=True)
                new_states.append(s)
            else:
                x = block(x, key_padding_mask=key_padding_mask, state=s)
        x = self.norm(x)
        if self.head_kind == "lm":
            logits = F.linear(x, self.embed.weight) if self.tie_embeddings else self.head(x)
            return (logits, (offset + N, new_states)) if return_state else logits
        return self.head(pool(x, key_padding_mask, self.pooling))


def pool(x: Tensor, key_padding_mask: Optional[Tensor], pooling: str) -> Tensor:
    """(B, N, d) -> (B, d): mean over real tokens, or the last real token."""
    B, N, _ = x.shape
    if key_padding_mask is None:
        return x.mean(1) if pooling == "mean" else x[:, -1]
    m = key_padding_mask.to(device=x.device, dtype=torch.bool)
    if pooling == "mean":
        w = m.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1.0)
    # Index of the last True per row (0 when a row has none).
    idx = (m.to(torch.long) * torch.arange(1, N + 1, device=x.device)).argmax(1)
    return x[torch.arange(B, device=x.device), idx]

