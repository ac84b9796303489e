"""Communication of context parallelism per GMA layer and training step, against ring attention.

    python benchmarks/context_parallel_comm.py [--ranks 2 4 8] [--tokens 131072] [--heads 16] ...

GMA (gmattn.torch.distributed): forward all_gathers every rank's state (S, z), B x H x (K x Dv + K)
float32 values per rank; backward all_reduces the gathered gradient (P states). Ring attention
(softmax attention split the same way) passes every other rank's K and V blocks forward, and in
backward K and V again plus their gradients. Bytes are what one rank receives, counted as ring
collectives move them (all_gather: (P - 1) blocks in; all_reduce of n values: 2 (P - 1) / P x n).
"""

from __future__ import annotations

import argparse


def gma_bytes(P: int, B: int, H: int, K: int, Dv: int) -> int:
    state = B * H * (K * Dv + K) * 4                      # float32 state, whatever the input dtype
    forward = (P - 1) * state                             # all_gather
    backward = 2 * (P - 1) * state                        # all_reduce of P states: 2 (P-1)/P x P x state
    return forward + backward


def ring_bytes(P: int, B: int, H: int, N: int, D: int, Dv: int, itemsize: int) -> int:
    block = B * (N // P) * H * (D + Dv) * itemsize        # one rank's K and V
    return (P - 1) * block + 2 * (P - 1) * block          # forward K,V; backward K,V and dK,dV


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def measure_overhead(N: int, H: int, K: int, D: int, repeats: int) -> None:
    """Compute overhead of the context-parallel call on one rank: a one-process group, so no
    communication; the extra work is the pass that forms the shard's state. Timed side by side."""
    import os
    import statistics
    import tempfile
    import time

    import torch
    import torch.distributed as dist

    import gmattn
    from gmattn.torch import distributed as cp

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, N, H, D, generator=g, requires_grad=True) for _ in range(3))
        mu, omega, alpha = torch.randn(H, K, D, requires_grad=True), torch.zeros(H, K, D, requires_grad=True), \
            torch.zeros(H, K, requires_grad=True)
        calls = {"one process": gmattn.gma_attention, "context parallel, 1 rank": cp.gma_attention}
        times = {name: [] for name in calls}
        for _ in range(repeats):
            for name, fn in calls.items():        # round-robin: both see the same spells of load
                t0 = time.perf_counter()
                fn(q, k, v, mu, omega, alpha, causal=True).sum().backward()
                times[name].append(time.perf_counter() - t0)
        dist.destroy_process_group()
    base = statistics.median(times["one process"])
    print(f"\ncompute overhead, causal forward+backward, N={N}, H={H}, K={K}, D=Dv={D}, "
          f"{torch.get_num_threads()} threads, median of {repeats}:")
    for name, ts in times.items():
        print(f"  {name:26s} {statistics.median(ts) * 1e3:8.1f} ms   {statistics.median(ts) / base:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072, 1048576])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--components", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--itemsize", type=int, default=2, help="bytes per K/V value of ring attention (2: bf16)")
    ap.add_argument("--measure", action="store_true", help="also time the compute overhead on this machine")
    ap.add_argument("--measure-tokens", type=int, default=16384)
    a = ap.parse_args()
    print(f"per layer and step, bytes received by one rank: B={a.batch}, H={a.heads}, K={a.components}, "
          f"D=Dv={a.head_dim}, ring attention K/V in {a.itemsize}-byte values\n")
    print("| ranks | tokens | GMA states | ring attention K/V | ring / GMA |")
    print("|---:|---:|---:|---:|---:|")
    for P in a.ranks:
        for N in a.tokens:
            g = gma_bytes(P, a.batch, a.heads, a.components, a.head_dim)
            r = ring_bytes(P, a.batch, a.heads, N, a.head_dim, a.head_dim, a.itemsize)
            print(f"| {P} | {N} | {human(g)} | {human(r)} | {r / g:,.0f}x |")
    if a.measure:
        measure_overhead(a.measure_tokens, 8, a.components, a.head_dim, repeats=7)


if __name__ == "__main__":
    main()
