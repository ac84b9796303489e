"""MixerBlock and SequenceModel in MLX: the twins of gmattn.mixers.blocks_torch (same names,
same structure, same weights)."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

import numpy as np

from ._common import (Exchange, check_model_args, check_positions, generate_tokens, init_block, model_state,
                      packed_positions, pool_packed, run_block, run_blocks)
from .config import MixerConfig
from .mlx_mixers import MLX_OPS, build


class MixerBlock(Exchange, nn.Module):
    """Pre-norm residual block: x + mixer(norm1(x)), then x + fc2(gelu(fc1(norm2(x))))."""

    def __init__(self, config: MixerConfig, mlp_ratio: float = 4.0, dropout: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        init_block(self, nn, build, config, mlp_ratio, dropout, norm_eps)

    def __call__(self, x: mx.array, key_padding_mask=None, state=None, return_state: bool = False, cu_seqlens=None):
        return run_block(self, "mlx", x, key_padding_mask, state, return_state, nn.gelu, cu_seqlens)


class SequenceModel(Exchange, nn.Module):
    """Token model: embedding (+ learned positions if max_len), MixerBlocks, final norm, head.
    Same arguments and calling convention as gmattn.mixers.blocks_torch.SequenceModel, packed
    sequences (cu_seqlens) included."""

    def __init__(self, config: MixerConfig, vocab_size: int, num_layers: int = 2, head: str = "lm",
                 num_classes: Optional[int] = None, pooling: str = "mean", max_len: Optional[int] = None,
                 tie_embeddings: bool = False, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        check_model_args(head, num_classes, pooling, tie_embeddings)
        d = config.d_model
        self.config, self.head_kind, self.pooling, self.tie_embeddings = config, head, pooling, tie_embeddings
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d)
        if max_len:
            self.pos_embed = nn.Embedding(max_len, d)
        self.blocks = [MixerBlock(config, mlp_ratio, dropout) for _ in range(num_layers)]
        self.norm = nn.LayerNorm(d)
        if head == "classification":
            self.head = nn.Linear(d, num_classes)
        elif not tie_embeddings:
            self.head = nn.Linear(d, vocab_size, bias=False)

    def __call__(self, tokens: mx.array, key_padding_mask=None, state=None, return_state: bool = False,
                 cu_seqlens=None):
        offset, layer_states = model_state(self, "mlx", tokens, state, return_state, cu_seqlens)
        B, N = tokens.shape
        x = self.embed(tokens)
        if cu_seqlens is None:
            if self.max_len:
                check_positions(offset, N, self.max_len)
                x = x + self.pos_embed(mx.arange(offset, offset + N))
            end = offset + N
        else:
            offsets, positions, end = packed_positions(type(self).__name__, tokens, key_padding_mask, cu_seqlens,
                                                       "mlx", offset, self.max_len)
            if self.max_len:
                x = x + self.pos_embed(mx.array(positions))
        x, new_states = run_blocks(self.blocks, x, key_padding_mask, layer_states, return_state, cu_seqlens)
        x = self.norm(x)
        if self.head_kind == "lm":
            logits = self.embed.as_linear(x) if self.tie_embeddings else self.head(x)
            return (logits, (end, new_states)) if return_state else logits
        if cu_seqlens is not None:
            return self.head(pool_packed(MLX_OPS, x, offsets, self.pooling))
        return self.head(pool(x, key_padding_mask, self.pooling))

    def generate(self, tokens: mx.array, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 eos_token: Optional[int] = None) -> mx.array:
        """Continues `tokens` (B, N) by up to `max_new_tokens`; same arguments and results as
        gmattn.mixers.blocks_torch.SequenceModel.generate (the same seed draws the same tokens
        from the same logits)."""
        return generate_tokens(
            self, tokens, max_new_tokens, temperature, top_k, top_p, seed, eos_token,
            last_logits=lambda logits: np.array(logits[:, -1].astype(mx.float32)),
            as_tokens=lambda ids: mx.array(ids).astype(tokens.dtype),
            concat=lambda pieces: mx.concatenate(pieces, axis=1), vocab_size=self.embed.weight.shape[0])


def pool(x: mx.array, key_padding_mask, pooling: str) -> mx.array:
    """(B, N, d) -> (B, d): mean over real tokens, or the last real token."""
    B, N, _ = x.shape
    if key_padding_mask is None:
        return x.mean(1) if pooling == "mean" else x[:, -1]
    m = key_padding_mask.astype(mx.bool_)
    if pooling == "mean":
        w = m.astype(x.dtype)[..., None]
        return (x * w).sum(1) / mx.maximum(w.sum(1), 1.0)
    idx = mx.argmax(m.astype(mx.int32) * mx.arange(1, N + 1), axis=1)
    return x[mx.arange(B), idx]
