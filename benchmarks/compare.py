"""GMA against softmax attention: time and memory across sequence lengths, with a verdict.

    python benchmarks/compare.py                  # about 1-2 minutes on a 2-core machine
    python benchmarks/compare.py --n 512,2048 --long-n 8192 --out /tmp/compare

Three implementations of causal attention on the same shapes, in one process, side by side:

  gma      gmattn.gma_attention (the compiled core)
  softmax  torch.nn.functional.scaled_dot_product_attention (SDPA), causal
  chunked  gmattn.reference.chunked_gma: the same math as gma in plain PyTorch

Shape: B=1, H=8 heads, D=Dv=64, K=64 components, float32, causal, torch's thread count. Softmax
attention's time grows as N^2, so it runs up to --n's largest N; GMA and chunked also run the
longer --long-n lengths.

Time: for each N the implementations run round-robin (A B C A B C ...; a load change on a busy
machine hits all of them alike), each turn lasting at least 0.1 s (short calls repeat within it,
each call a sample); the median is reported. forward = one call under torch.no_grad();
forward+backward = one call and out.backward(g) (gradients of q, k, v and the mixture parameters).

Memory: the first call of each (implementation, N, mode) is the warm-up; it runs under a probe of
the process's peak resident memory (Linux: VmHWM reset through /proc/self/clear_refs after
freeing what can be freed), so the figure is what one call needs beyond its inputs: saved
activations, temporaries, outputs and gradients. (Every implementation runs once at N = 64 in
both modes before the first measurement, so that what the process sets up once is nobody's.)

Output: a table, a plain-language verdict computed from the measurements, <out>/results.json and
<out>/compare.png (default out: benchmarks/results/compare).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

from cpu import make_call, med, run_cell  # benchmarks/cpu.py: the implementations and the round-robin

IMPLS = ("gma", "softmax", "chunked")
CPU_NAMES = {"gma": "core", "softmax": "sdpa", "chunked": "chunked"}  # make_call's names
LABELS = {"gma": "GMA (gmattn)", "softmax": "softmax attention (SDPA)", "chunked": "GMA in plain PyTorch (chunked)"}
MODES = ("forward", "train")
MODE_TEXT = {"forward": "forward (inference)", "train": "forward+backward (training)"}
SHAPE = dict(B=1, H=8, D=64, K=64)
TURN_SECONDS = 0.1


def warm_up_process(impls) -> None:
    """One call of every implementation in both modes at a small N, measured nowhere: what a
    process sets up once (torch's first backward takes about 35 MiB of resident memory, whichever
    operator runs it) would otherwise count as the memory of whichever runs first."""
    B, H, D, K = (SHAPE[x] for x in ("B", "H", "D", "K"))
    for mode in MODES:
        for impl in impls:
            make_call(CPU_NAMES[impl], B, 64, H, K, D, D, True, mode == "train")()


def measure_point(impls, N: int, repeats: int) -> Dict[str, dict]:
    """Peak memory (warm-up call) and median time of each implementation at N, both modes."""
    import gmattn
    from gmattn.bench import PeakMemory, can_reset_peak_rss

    B, H, D, K = (SHAPE[x] for x in ("B", "H", "D", "K"))
    reset = can_reset_peak_rss()
    out: Dict[str, dict] = {impl: {"n": N} for impl in impls}
    for mode in MODES:
        calls = {impl: make_call(CPU_NAMES[impl], B, N, H, K, D, D, True, mode == "train") for impl in impls}
        for impl, call in calls.items():
            gmattn.empty_cache()  # the core's kept blocks would otherwise hide its first call's memory
            with PeakMemory("torch", reset) as probe:
                call()
            if reset:
                out[impl][f"{mode}_peak_mib"] = probe.bytes / 2**20
        times = run_cell(calls, repeats, min_seconds=TURN_SECONDS, warmup=False)
        for impl in impls:
            out[impl][f"{mode}_ms"] = med(times[impl]) * 1e3
            out[impl][f"{mode}_samples"] = len(times[impl])
    return out


# ----------------------------------------------------------------------------------------------
# The verdict: plain sentences computed from the measurements
# ----------------------------------------------------------------------------------------------
def _series(results: List[dict], impl: str, key: str) -> Dict[int, float]:
    return {r["n"]: r[key] for r in results if r["impl"] == impl and r.get(key) is not None}


def _n(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _times(x: float) -> str:
    return f"{x:.1f}x" if x < 10 else f"{x:.0f}x"


def speed_sentence(results: List[dict], mode: str, other: str) -> str:
    """Where GMA is faster than `other` in `mode`, by how much, and where it is not."""
    a, b = _series(results, "gma", f"{mode}_ms"), _series(results, other, f"{mode}_ms")
    ns = sorted(set(a) & set(b))
    if not ns:
        return ""
    speedup = {n: b[n] / a[n] for n in ns}
    wins = [n for n in ns if speedup[n] > 1.0]
    losses = [n for n in ns if speedup[n] <= 1.0]
    what = f"{MODE_TEXT[mode]}, against {LABELS[other]}"
    if not wins:
        return f"{what}: GMA is slower at every N measured ({_times(1 / speedup[ns[-1]])} slower at N={_n(ns[-1])})."
    won_from = next(n for n in ns if all(speedup[m] > 1.0 for m in ns if m >= n)) if speedup[ns[-1]] > 1.0 else None
    if won_from is None:
        text = f"{what}: GMA is faster at N={', '.join(_n(n) for n in wins)} only"
    elif won_from == ns[-1]:
        text = f"{what}: GMA is faster at N={_n(won_from)}, the longest measured ({_times(speedup[won_from])})"
    else:
        text = (f"{what}: GMA is faster from N={_n(won_from)} on, {_times(speedup[won_from])} at N={_n(won_from)} "
                f"and {_times(speedup[ns[-1]])} at N={_n(ns[-1])}")
    if losses:
        worst = min(losses, key=lambda n: speedup[n])
        text += (f"; slower at N={', '.join(_n(n) for n in losses)} "
                 f"({_times(1 / speedup[worst])} slower at N={_n(worst)})")
    return text + "."


def growth_exponent(series: Dict[int, float]) -> Optional[float]:
    """p in cost ~ N^p, fitted between the two largest N measured (small N is dominated by fixed costs)."""
    ns = sorted(n for n, v in series.items() if v > 0)
    if len(ns) < 2:
        return None
    n0, n1 = ns[-2], ns[-1]
    return math.log(series[n1] / series[n0]) / math.log(n1 / n0)


def memory_sentence(results: List[dict]) -> str:
    key = "train_peak_mib"
    gma, soft = _series(results, "gma", key), _series(results, "softmax", key)
    ns = sorted(set(gma) & set(soft))
    if not ns:
        return ""
    n = ns[-1]
    ratio = soft[n] / gma[n] if gma[n] > 0 else float("inf")
    if ratio > 1.2:
        compare = f"softmax attention needs {_times(ratio)} as much"
    elif ratio < 1 / 1.2:
        compare = f"softmax attention needs {_times(1 / ratio)} less"
    else:
        compare = "softmax attention needs about as much"
    parts = [f"memory of a training step (beyond the inputs) at N={_n(n)}: GMA {gma[n]:.0f} MiB, {compare} "
             f"({soft[n]:.0f} MiB)"]
    exps = {impl: growth_exponent(_series(results, impl, key)) for impl in IMPLS}
    grows = ", ".join(f"{impl} ~N^{p:.1f}" for impl, p in exps.items() if p is not None)
    if grows:
        parts.append(f"growth between the two longest lengths: {grows}")
    return "; ".join(parts) + "."


def verdict(results: List[dict]) -> List[str]:
    lines = [speed_sentence(results, mode, "softmax") for mode in reversed(MODES)]
    lines += [speed_sentence(results, "train", "chunked"), memory_sentence(results)]
    return [line for line in lines if line]


# ----------------------------------------------------------------------------------------------
# Table and plot
# ----------------------------------------------------------------------------------------------
def table(results: List[dict], ns: List[int]) -> str:
    rows = [f"{'N':>7s} | {'forward (ms)':^26s} | {'forward+backward (ms)':^26s} | {'fwd+bwd memory (MiB)':^26s}",
            f"{'':>7s} | " + " | ".join(f"{'gma':>8s}{'softmax':>9s}{'chunked':>9s}" for _ in range(3))]
    for n in ns:
        cells = []
        for key in ("forward_ms", "train_ms", "train_peak_mib"):
            vals = [_series(results, impl, key).get(n) for impl in IMPLS]
            cells.append("".join(f"{'-' if v is None else _fmt(v):>{8 if i == 0 else 9}s}" for i, v in enumerate(vals)))
        rows.append(f"{_n(n):>7s} | " + " | ".join(cells))
    return "\n".join(rows)


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def plot(results: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"gma": "tab:red", "softmax": "tab:blue", "chunked": "tab:gray"}
    panels = (("forward_ms", "forward: time (ms)"), ("train_ms", "forward+backward: time (ms)"),
              ("train_peak_mib", "forward+backward: peak memory (MiB)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    for ax, (key, ylabel) in zip(axes, panels):
        for impl in IMPLS:
            pts = sorted(_series(results, impl, key).items())
            if pts:
                ax.plot([n for n, _ in pts], [max(v, 1e-3) for _, v in pts], "-o", ms=4, color=colors[impl],
                        label=LABELS[impl])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_title(ylabel, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)  # below the panels, off the data
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _csv_ints(text: str) -> List[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="256,512,1024,2048,4096,8192,16384",
                    help="sequence lengths for all three implementations (default 256..16384)")
    ap.add_argument("--long-n", default="65536",
                    help="longer lengths for gma and chunked only (default 65536; '' for none)")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds per N (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compare"))
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the core follows torch's thread count
    t0 = time.perf_counter()
    ns, long_ns = sorted(_csv_ints(args.n)), sorted(_csv_ints(args.long_n))
    shape = (f"causal, B={SHAPE['B']}, H={SHAPE['H']}, D=Dv={SHAPE['D']}, K={SHAPE['K']}, float32, "
             f"{torch.get_num_threads()} threads")
    print(f"GMA against softmax attention ({shape}); lengths {', '.join(_n(n) for n in ns + long_ns)}", flush=True)
    warm_up_process(IMPLS)
    results: List[dict] = []
    for n in ns + long_ns:
        impls = IMPLS if n in ns else ("gma", "chunked")
        point = measure_point(impls, n, args.repeats)
        results += [{"impl": impl, **point[impl]} for impl in impls]
        print(f"  N={_n(n):>4s} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "compare.png")
    plot(results, png, f"GMA against softmax attention: {shape}")
    lines = verdict(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"shape": shape, "repeats": args.repeats, "results": results, "verdict": lines,
                   "wall_seconds": time.perf_counter() - t0}, f, indent=1)
    print("\n" + table(results, ns + long_ns))
    print("\nVerdict (medians measured just now, on this machine):")
    for line in lines:
        print("  - " + line[0].upper() + line[1:])
    print(f"\nplot: {png}\nresults: {os.path.join(args.out, 'results.json')} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
