"""CPU core speed across memory layouts of q, k, v (and the output gradient): each layout's time
as a ratio to the contiguous (B, N, H, D) layout, measured side by side.

Layouts (every one holds the same values; the kernels take any strides the binding accepts):

  contiguous   C order (B, N, H, D), D innermost
  bhnd         a (B, H, N, D) array viewed as (B, N, H, D) (a transposed projection's output)
  fortran      Fortran order: D outermost, B innermost (np.asfortranarray)
  negative     every stride negative (an array reversed along every axis, viewed back)
  zero         batch rows broadcast from one row: stride 0 along B (np.broadcast_to)

The problem's batch rows are equal, so that the broadcast layout holds the same values as the
others. For each case (forward or forward+backward, causal or bidirectional, N) the layouts run
round-robin (one call each per round, after a warm-up), and each ratio is the median of the
layout's times over the median of the contiguous ones. With one thread (the default) the time is
the calling thread's CPU time (time.thread_time: the kernels run on that thread, and a stretch
descheduled on a busy machine does not count); with more threads, wall time. Forward: the core's forward on NumPy
arrays (gmattn.numpy_ops.host_forward); forward+backward: the forward saving what backward needs,
then the backward with an output gradient in the same layout as q, k, v.

    python benchmarks/layouts.py                        # B=2, H=2, D=Dv=K=64, N=1024,4096, 1 thread
    python benchmarks/layouts.py --n 256 --rounds 3     # quick
    python benchmarks/layouts.py --threads 2            # wall time
    python benchmarks/layouts.py --out /tmp/layouts.json

Writes JSON (default benchmarks/results/layouts.json): the configuration, and per case the
contiguous median (ms) and every layout's ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import numpy as np

from gmattn import numpy_ops

_HERE = os.path.dirname(os.path.abspath(__file__))

def _reversed(x: np.ndarray) -> np.ndarray:
    every_axis = (slice(None, None, -1),) * x.ndim
    return np.ascontiguousarray(x[every_axis])[every_axis]


# name -> a function giving the same values as the contiguous (B, N, H, D) array x in that layout
LAYOUTS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "contiguous": np.ascontiguousarray,
    "bhnd": lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3),
    "fortran": np.asfortranarray,
    "negative": _reversed,
    "zero": lambda x: np.broadcast_to(x[:1], x.shape),  # needs equal batch rows
}


def problem(B: int, N: int, H: int, D: int, Dv: int, K: int, dtype=np.float32, seed: int = 0):
    """q, k, v, dout (B, N, H, *) with equal batch rows, and mu, omega, alpha."""
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal((1, N, H, d)).astype(dtype) for d in (D, D, Dv, Dv)]
    q, k, v, dout = (np.repeat(r, B, axis=0) for r in rows)
    mu = rng.standard_normal((H, K, D)).astype(dtype)
    omega = (0.5 * rng.standard_normal((H, K, D))).astype(dtype)
    alpha = rng.standard_normal((H, K)).astype(dtype)
    return q, k, v, dout, mu, omega, alpha


def gma_call(q, k, v, dout, mu, omega, alpha, *, causal: bool, backward: bool, threads: int):
    """Forward on the given arrays, or forward (saving for backward) then backward with dout:
    returns every result (out; with backward, dq, dk, dv, dmu, domega, dalpha)."""
    common = dict(causal=causal, eps=1e-6, sigma_eps=1e-4, num_threads=threads)
    out, _, _, gq, gk, den = numpy_ops.host_forward(q, k, v, mu, omega, alpha, None, None, None,
                                                    return_state=False, save=backward, **common)
    if not backward:
        return (out,)
    grads = numpy_ops.host_backward(q, k, v, mu, omega, alpha, None, None, None, out, gq, gk, den, dout,
                                    None, None, **common)
    return (out,) + grads[:6]


def round_robin(calls: Dict[str, Callable[[], object]], rounds: int, clock) -> Dict[str, List[float]]:
    """Each callable's times, one call a round, the callables interleaved, after a warm-up call each.
    clock: time.perf_counter (wall time) or time.thread_time (the calling thread's CPU time)."""
    for call in calls.values():
        call()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = clock()
            call()
            times[name].append(clock() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="1024,4096", help="sequence lengths, comma separated")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64, help="D = Dv")
    ap.add_argument("--components", type=int, default=64, help="K")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "layouts.json"))
    args = ap.parse_args(argv)
    clock_name = "thread CPU time" if args.threads == 1 else "wall time"
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    config = dict(B=args.batch, H=args.heads, D=args.dim, Dv=args.dim, K=args.components, threads=args.threads,
                  rounds=args.rounds, dtype="float32", clock=clock_name, layouts=list(LAYOUTS))
    print(f"B={args.batch} H={args.heads} D=Dv={args.dim} K={args.components} float32, {args.threads} thread(s), "
          f"{clock_name}, medians of {args.rounds} round-robin rounds; time / contiguous time")
    print(f"{'case':<28}{'contiguous':>12}" + "".join(f"{name:>12}" for name in LAYOUTS if name != "contiguous"))
    cases = []
    for n in (int(x) for x in args.n.split(",")):
        q, k, v, dout, mu, omega, alpha = problem(args.batch, n, args.heads, args.dim, args.dim, args.components)
        for backward in (False, True):
            for causal in (True, False):
                calls = {}
                for name, layout in LAYOUTS.items():
                    arrays = [layout(x) for x in (q, k, v, dout)]
                    calls[name] = (lambda a=arrays: gma_call(*a, mu, omega, alpha, causal=causal, backward=backward,
                                                            threads=args.threads))
                times = round_robin(calls, args.rounds, clock)
                medians = {name: statistics.median(t) for name, t in times.items()}
                base = medians["contiguous"]
                case = dict(N=n, backward=backward, causal=causal, contiguous_ms=1e3 * base,
                            ratios={name: m / base for name, m in medians.items() if name != "contiguous"})
                cases.append(case)
                label = f"N={n} {'fwd+bwd' if backward else 'fwd'} {'causal' if causal else 'bidirectional'}"
                print(f"{label:<28}{1e3 * base:>10.2f}ms" + "".join(f"{r:>12.2f}" for r in case["ratios"].values()),
                      flush=True)
    worst = max(r for case in cases for r in case["ratios"].values())
    print(f"worst ratio to contiguous: {worst:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(config=config, cases=cases, worst_ratio=worst), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
