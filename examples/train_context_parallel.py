"""Train a small GMA language model with each sequence split across processes (context parallel).

    torchrun --nproc_per_node 2 examples/train_context_parallel.py --steps 30

Every rank holds a contiguous shard of every sequence of the batch (rank order = sequence order).
GMA layers exchange only their K-slot states between ranks (gmattn.torch.distributed), so each
rank stores activations for its own tokens only. The parameters are replicated: each rank's
gradients are its share of the whole gradient and are summed with one all_reduce per step.

At the end rank 0 checks the result: the context-parallel loss of a fresh batch equals the loss
of the same model run on the whole sequences in one process.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gmattn.mixers import build_model
from gmattn.torch.distributed import ContextParallelModel


def batch(step: int, batch_size: int, length: int, vocab: int) -> torch.Tensor:
    """Sequences with structure to learn: each a random key pattern of 8 tokens, repeated."""
    g = torch.Generator().manual_seed(step)
    pattern = torch.randint(0, vocab, (batch_size, 8), generator=g)
    return pattern.repeat(1, length // 8 + 2)[:, : length + 1]


def shard(length: int, rank: int, world: int) -> slice:
    """Contiguous, near-equal shards; the last ranks take one token less when it does not divide."""
    base, extra = divmod(length, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence (split across ranks)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)                      # the same initial weights on every rank
    vocab = 64
    model = build_model("gma", vocab_size=vocab, num_layers=2, d_model=64, num_heads=4, num_components=16,
                        causal=True, max_len=args.length)
    parallel = ContextParallelModel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    mine = shard(args.length, rank, world)
    total_tokens = args.batch_size * args.length

    def shard_loss(tokens: torch.Tensor) -> torch.Tensor:
        logits = parallel(tokens[:, :-1][:, mine])
        # This rank's share of the mean over all tokens of the batch: summed over ranks it is the mean.
        return F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:][:, mine].reshape(-1),
                               reduction="sum") / total_tokens

    for step in range(args.steps):
        loss = shard_loss(batch(step, args.batch_size, args.length, vocab))
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():          # sum the ranks' shares of every gradient
            dist.all_reduce(p.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {total.item():.4f}  ({world} ranks, {mine.stop - mine.start} tokens each)")

    with torch.no_grad():
        tokens = batch(10**6, args.batch_size, args.length, vocab)
        parallel_loss = shard_loss(tokens)
        dist.all_reduce(parallel_loss)
        if rank == 0:
            from gmattn.torch.distributed import context_parallel

            context_parallel(model, enabled=False)
            logits = model(tokens[:, :-1])
            whole = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
            print(f"check: context-parallel loss {parallel_loss.item():.6f}, one process {whole.item():.6f}, "
                  f"difference {abs(parallel_loss.item() - whole.item()):.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
