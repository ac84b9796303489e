"""MixerBlock and SequenceModel in PyTorch: swap the mixer by one word (config.kind)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (Exchange, check_model_args, check_positions, generate_tokens, init_block, model_state,
                      packed_positions, pool_packed, run_block, run_blocks)
from .config import MixerConfig
from .torch_mixers import TORCH_OPS, build


class MixerBlock(Exchange, nn.Module):
    """Pre-norm residual block: x + mixer(norm1(x)), then x + fc2(gelu(fc1(norm2(x)))).

    forward(x, key_padding_mask=None, state=None, return_state=False, cu_seqlens=None) follows the
    mixer's calling convention; the state is the mixer's.
    """

    def __init__(self, config: MixerConfig, mlp_ratio: float = 4.0, dropout: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        init_block(self, nn, build, config, mlp_ratio, dropout, norm_eps)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, state=None, return_state: bool = False,
                cu_seqlens: Optional[Tensor] = None):
        return run_block(self, "torch", x, key_padding_mask, state, return_state, F.gelu, cu_seqlens)


class SequenceModel(Exchange, nn.Module):
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

    forward(tokens (B, N) int, key_padding_mask=None, state=None, return_state=False,
    cu_seqlens=None). With the "lm" head, state = (position offset, [state of each block])
    continues a sequence.

    Packed sequences: tokens (1, N) hold S sequences one after another, cu_seqlens their S + 1
    offsets (int32/int64, from 0 to N; read on the host). Positions restart at each sequence's
    first token, every mixer mixes each sequence on its own, the "lm" logits stay (1, N, vocab),
    the classification logits are (S, num_classes) (pooled per sequence), and the state has a
    position offset and a block-state row per sequence (continue it with the next pieces' offsets).
    """

    def __init__(self, config: MixerConfig, vocab_size: int, num_layers: int = 2, head: str = "lm",
                 num_classes: Optional[int] = None, pooling: str = "mean", max_len: Optional[int] = None,
                 tie_embeddings: bool = False, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        check_model_args(head, num_classes, pooling, tie_embeddings)
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
                return_state: bool = False, cu_seqlens: Optional[Tensor] = None):
        offset, layer_states = model_state(self, "torch", tokens, state, return_state, cu_seqlens)
        B, N = tokens.shape
        x = self.embed(tokens)
        if cu_seqlens is None:
            if self.pos_embed is not None:
                check_positions(offset, N, self.max_len)
                x = x + self.pos_embed(torch.arange(offset, offset + N, device=tokens.device))
            end = offset + N
        else:
            offsets, positions, end = packed_positions(type(self).__name__, tokens, key_padding_mask, cu_seqlens,
                                                       "torch", offset, self.max_len)
            if self.pos_embed is not None:
                x = x + self.pos_embed(torch.from_numpy(positions).to(tokens.device))
        x, new_states = run_blocks(self.blocks, x, key_padding_mask, layer_states, return_state, cu_seqlens)
        x = self.norm(x)
        if self.head_kind == "lm":
            logits = F.linear(x, self.embed.weight) if self.tie_embeddings else self.head(x)
            return (logits, (end, new_states)) if return_state else logits
        if cu_seqlens is not None:
            return self.head(pool_packed(TORCH_OPS, x, offsets, self.pooling))
        return self.head(pool(x, key_padding_mask, self.pooling))

    def generate(self, tokens: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: Optional[int] = None,
                 eos_token: Optional[int] = None) -> Tensor:
        """Continues `tokens` (B, N) by up to `max_new_tokens`: (B, N + new) token ids.

        The prompt runs in one call (the chunked kernels), then one call per token carries the
        state (GMA, linear, performer, ssm: constant size; softmax: its KV cache). temperature=0
        is greedy (arg-max); otherwise tokens are drawn from softmax(logits / temperature),
        restricted to the top_k most likely and to the nucleus of probability top_p, with a
        NumPy generator seeded by `seed`. With eos_token, a row that produced it repeats it, and
        generation stops once every row has. Runs under torch.inference_mode(); dropout follows
        the module's mode (call .eval() first for deterministic decoding).
        """
        with torch.inference_mode():
            return generate_tokens(
                self, tokens, max_new_tokens, temperature, top_k, top_p, seed, eos_token,
                last_logits=lambda logits: logits[:, -1].float().cpu().numpy(),
                as_tokens=lambda ids: torch.as_tensor(ids, dtype=tokens.dtype, device=tokens.device),
                concat=lambda pieces: torch.cat(pieces, dim=1), vocab_size=self.embed.num_embeddings)


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

