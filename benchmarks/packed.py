"""Packed variable-length sequences (cu_seqlens) against batch rows, on the CPU core.

Two comparisons, each timed round-robin on the same machine (benchmarks/cpu.py's run_cell: a
warm-up call, then rounds A B A B ..., every turn at least 0.3 s of back-to-back calls, medians):

  many short   the same 16000 tokens as 1000 sequences of 16 packed in one row (B = 1,
               cu_seqlens) against 16 batch rows of 1000: time per token, packed / rows. The
               packed call must not cost more per token for being 1000 sequences.
  length mix   64 documents of a realistic length mix (log-normal, median ~300 tokens, clipped
               to [16, 4096]) packed in one row against the same documents padded to the longest
               (B = 64, key_padding_mask marking the real tokens): time per real token, and the
               padded call's share of pad tokens.

H = 8, K = 64, D = Dv = 64, float32, forward (under no_grad) and forward+backward (gradients of
q, k, v, mu, omega, alpha), causal and bidirectional, torch front end with all of torch's threads.

    python benchmarks/packed.py            # ~2 min on 2 cores
    python benchmarks/packed.py --quick    # tiny sizes, seconds (smoke test)
    python benchmarks/packed.py --out /tmp/packed.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from typing import Callable, List, Optional

import numpy as np
import torch

import gmattn
from gmattn import _ext

_spec = importlib.util.spec_from_file_location("bench_cpu", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                          "cpu.py"))
bench_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_cpu)


def length_mix(count: int, seed: int = 0, longest: int = 4096) -> List[int]:
    """Document lengths: log-normal around 300 tokens (a heavy tail, as in web text), [16, longest]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=np.log(300), sigma=1.0, size=count), 16, longest).astype(int).tolist()


def make_call(B: int, N: int, H: int, K: int, D: int, causal: bool, backward: bool, *,
              cu_seqlens: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> Callable[[], None]:
    """One forward (or forward+backward) of gmattn.gma_attention on random float32 inputs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=g).requires_grad_(backward) for _ in range(3))
    mu = torch.randn(H, K, D, generator=g).requires_grad_(backward)
    omega = (0.5 * torch.randn(H, K, D, generator=g)).requires_grad_(backward)
    alpha = (0.5 * torch.randn(H, K, generator=g)).requires_grad_(backward)
    inputs = (q, k, v, mu, omega, alpha)

    def forward():
        return gmattn.gma_attention(*inputs, causal=causal, cu_seqlens=cu_seqlens, key_padding_mask=mask)

    if not backward:
        def call():
            with torch.no_grad():
                forward()
        return call
    gout = torch.randn(B, N, H, D, generator=g)

    def call_backward():
        for t in inputs:
            t.grad = None
        forward().backward(gout)

    return call_backward


def compare(calls: dict, tokens: dict, repeats: int, min_seconds: float) -> dict:
    times = bench_cpu.run_cell(calls, repeats, min_seconds=min_seconds)
    return {name: statistics.median(ts) / tokens[name] * 1e9 for name, ts in times.items()}  # ns per token


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds): a smoke test")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    quick = args.quick
    H, K, D = (2, 8, 16) if quick else (8, 64, 64)
    short, count = (16, 50) if quick else (16, 1000)  # `count` sequences of `short` tokens
    docs = length_mix(8 if quick else 64, longest=512 if quick else 4096)
    repeats, min_seconds = (2, 0.0) if quick else (5, 0.3)
    print(f"gmattn {gmattn.__version__}, CPU core ({_ext.core().isa}), {torch.get_num_threads()} threads; "
          f"H={H}, K={K}, D=Dv={D}, float32")
    results = {"quick": quick, "H": H, "K": K, "D": D, "threads": torch.get_num_threads(), "many_short": [],
               "length_mix": [], "documents": docs}

    print(f"\nmany short: {count} sequences of {short} packed in one row vs {short} rows of {count} "
          f"({count * short} tokens), ns per token")
    print(f"{'mode':<16} {'packed':>10} {'rows':>10} {'packed/rows':>12}")
    offsets = torch.arange(0, count * short + 1, short, dtype=torch.int64)
    for causal in (True, False):
        for backward in (False, True):
            mode = ("causal" if causal else "bidir") + (" fwd+bwd" if backward else " fwd")
            calls = {"packed": make_call(1, count * short, H, K, D, causal, backward, cu_seqlens=offsets),
                     "rows": make_call(short, count, H, K, D, causal, backward)}
            ns = compare(calls, {"packed": count * short, "rows": count * short}, repeats, min_seconds)
            row = {"mode": mode, "packed_ns": ns["packed"], "rows_ns": ns["rows"], "ratio": ns["packed"] / ns["rows"]}
            results["many_short"].append(row)
            print(f"{mode:<16} {ns['packed']:>10.1f} {ns['rows']:>10.1f} {row['ratio']:>12.2f}")

    real, longest = sum(docs), max(docs)
    pad_share = 1 - real / (len(docs) * longest)
    print(f"\nlength mix: {len(docs)} documents, {real} tokens (median {int(np.median(docs))}, longest {longest}); "
          f"packed in one row vs padded to the longest ({pad_share:.0%} pad tokens), ns per real token")
    print(f"{'mode':<16} {'packed':>10} {'padded':>10} {'packed/padded':>14}")
    offsets = torch.tensor(np.cumsum([0] + docs), dtype=torch.int64)
    mask = torch.arange(longest)[None, :] < torch.tensor(docs)[:, None]
    for causal in (True, False):
        for backward in (False, True):
            mode = ("causal" if causal else "bidir") + (" fwd+bwd" if backward else " fwd")
            calls = {"packed": make_call(1, real, H, K, D, causal, backward, cu_seqlens=offsets),
                     "padded": make_call(len(docs), longest, H, K, D, causal, backward, mask=mask)}
            ns = compare(calls, {"packed": real, "padded": real}, repeats, min_seconds)
            row = {"mode": mode, "packed_ns": ns["packed"], "padded_ns": ns["padded"],
                   "ratio": ns["packed"] / ns["padded"]}
            results["length_mix"].append(row)
            print(f"{mode:<16} {ns['packed']:>10.1f} {ns['padded']:>10.1f} {row['ratio']:>14.2f}")
    results["pad_share"] = pad_share
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
