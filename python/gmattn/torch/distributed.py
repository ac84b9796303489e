"""Context parallelism for GMA over torch.distributed: one long sequence split across ranks.

Each rank of a process group holds a contiguous shard of the same sequences (rank order is
sequence order; shards may differ in length). GMA's memory of a shard is its state
``(S, z) = (Gk^T V, Gk^T 1)``: K x Dv + K numbers per head, whatever the shard's length. So a rank
needs only the *states* of the other shards, not their keys and values:

- causal: a rank starts its scan from the sum of the states of the ranks before it (an exclusive
  scan over ranks);
- bidirectional: every query reads the total memory, so a rank adds the states of all other ranks.

One ``all_gather`` of the per-rank states does both (the linear-attention form of this is LASP,
Sun et al. 2024). Backward sends the state gradients back with one ``all_reduce``. Both are
torch.distributed collectives, so any backend works (gloo on CPU, NCCL on GPU).

Costs, per GMA layer and step: forward gathers ``P x B x H x (K x Dv + K)`` state values on every
rank, backward all-reduces as many; ring attention passes every other rank's K and V blocks
(``(P - 1) x B x N_shard x H x (D + Dv)`` values forward, and twice that backward). Compute: the
shard's state is formed by an extra pass of the op over the shard's keys (docs/scaling.md has the
numbers).

Gradients of mu / omega / alpha on a rank are that rank's share of the full gradient; sum them
over ranks (DDP's all-reduce does, or call ``torch.distributed.all_reduce`` on each).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layers import GaussianMixtureAttention
from .ops import gma_attention as _local_gma_attention

__all__ = ["gma_attention", "shard_offset", "context_parallel", "ContextParallelModel"]


def _check_group(group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "gmattn.torch.distributed: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment)"
        )


class _GatherStates(torch.autograd.Function):
    """all_gather of one flat tensor per rank, differentiable: the gradient of a rank's tensor is
    the sum over ranks of the gradients its gathered copies received (one all_reduce)."""

    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.group = group
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local.contiguous(), group=group)
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def _pack(state: Tuple[Tensor, Tensor]) -> Tensor:
    S, z = state
    B, H, K, Dv = S.shape
    return torch.cat([S.reshape(B, H, K * Dv), z.reshape(B, H, K)], dim=-1)


def _unpack(flat: Tensor, K: int, Dv: int) -> Tuple[Tensor, Tensor]:
    B, H, _ = flat.shape
    return flat[..., : K * Dv].reshape(B, H, K, Dv), flat[..., K * Dv:]


def gma_attention(q: Tensor, k: Tensor, v: Tensor, mu: Tensor, omega: Tensor, alpha: Tensor, *,
                  causal: bool = False, group=None, key_padding_mask: Optional[Tensor] = None,
                  eps: float = 1e-6, sigma_eps: float = 1e-4) -> Tensor:
    """GMA over a sequence split across the ranks of `group` (default: the world).

    Arguments are those of `gmattn.gma_attention` for this rank's shard: q, k (B, N_r, H, D),
    v (B, N_r, H, Dv), key_padding_mask (B, N_r). Every rank must pass the same B, H, K, Dv and
    parameters; N_r may differ between ranks (zero too). Returns this shard's output
    (B, N_r, H, Dv), equal to the matching rows of one `gma_attention` call on the whole sequence.
    """
    _check_group(group)
    K, Dv = mu.shape[1], v.shape[-1]
    common = dict(key_padding_mask=key_padding_mask, eps=eps, sigma_eps=sigma_eps)
    # This shard's memory (S, z) = Gk^T [V, 1] (the op's final state; its reads are not used).
    _, local = _local_gma_attention(k, k, v, mu, omega, alpha, causal=False, output_final_state=True, **common)
    states = _GatherStates.apply(_pack(local), group)              # (P, B, H, K*Dv + K)
    rank = dist.get_rank(group)
    others = states[:rank] if causal else torch.cat([states[:rank], states[rank + 1:]])
    # Rank 0 of a causal scan starts from zeros, but from the gathered states all the same: every
    # rank's backward must reach the gather's all_reduce, or the others would wait for it forever.
    initial = _unpack(others.sum(0), K, Dv)
    return _local_gma_attention(q, k, v, mu, omega, alpha, causal=causal, initial_state=initial, **common)


def shard_offset(length: int, group=None) -> int:
    """Position of this rank's first token in the whole sequence: the lengths of the shards of the
    ranks before it (one all_gather of the lengths)."""
    _check_group(group)
    lengths: List[Optional[int]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(lengths, int(length), group=group)
    return sum(lengths[: dist.get_rank(group)])


def context_parallel(module: nn.Module, group=None, enabled: bool = True) -> nn.Module:
    """Makes every `GaussianMixtureAttention` in `module` (the module itself included) run
    context-parallel over `group`; `enabled=False` turns it off again. Returns `module`.

    Only GMA layers know how to combine shards: a module that contains another kind of mixer
    (softmax, linear, ...) gets a ValueError rather than silently wrong results.
    """
    from ..mixers import blocks_torch  # noqa: F401 (MixerBlock's mixer attribute)

    layers = [m for m in module.modules() if isinstance(m, GaussianMixtureAttention)]
    others = [type(m.mixer).__name__ for m in module.modules()
              if isinstance(m, blocks_torch.MixerBlock) and not isinstance(m.mixer, GaussianMixtureAttention)]
    if others:
        raise ValueError(f"context_parallel: only GMA mixers can run context-parallel; the module has {others}")
    if not layers:
        raise ValueError("context_parallel: the module contains no GaussianMixtureAttention layer")
    if enabled:
        _check_group(group)
    for layer in layers:
        layer.context_parallel_group = group if enabled else None
        layer.context_parallel = enabled
    return module


class ContextParallelModel(nn.Module):
    """A GMA `SequenceModel` with the LM head, run context-parallel: each rank passes its shard of
    the token rows (B, N_r) and gets that shard's logits; positions continue across shards.

        model = ContextParallelModel(gmattn.build_model("gma", vocab_size=256, causal=True, ...))
        logits = model(tokens[:, start:stop])
    """

    def __init__(self, model: nn.Module, group=None):
        super().__init__()
        if getattr(model, "head_kind", None) != "lm":
            raise ValueError("ContextParallelModel: needs a SequenceModel with the 'lm' head (a classification "
                             "head pools over the whole sequence, which spans ranks)")
        self.model = context_parallel(model, group)
        self.group = group

    def forward(self, tokens: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        offset = shard_offset(tokens.shape[1], self.group) if self.model.pos_embed is not None else 0
        return self.model(tokens, key_padding_mask=key_padding_mask,
                          state=(offset, [None] * len(self.model.blocks)))
