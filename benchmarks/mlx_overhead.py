"""Overhead of the MLX front end over calling the compiled core on NumPy arrays directly.

Both sides run the same kernels of `gmattn._core` on the same data in one process, interleaved
(A B B A ...), and the script prints the medians side by side with their ratio:

* forward:            gmattn.mlx.gma_attention(...) + mx.eval   vs   core.forward on NumPy arrays
                      (a fresh np.empty output per call, as gmattn.numpy_ops does)
* forward + backward: mx.vjp through the op (save_for_backward=True)   vs   core.forward (saving the
                      responsibilities) + core.backward on NumPy arrays, fresh outputs per call.
                      The default save_for_backward=False path (backward recomputes the forward)
                      is shown for information.

Timings of separate calls are noisy on a loaded machine, so the script also measures the front
end's own cost inside each MLX call (call time minus the kernel's time in that same call).

It also checks the zero-copy claim: an evaluated mx.array viewed as NumPy has MLX's own data
pointer, and it times that view against a real copy and against the one output copy.

    python benchmarks/mlx_overhead.py                 # B=1 N=4096 H=8 D=Dv=64 K=64 float32
    python benchmarks/mlx_overhead.py --causal --json out.json

The acceptance bar of the MLX front end is a forward ratio <= 1.10 at N=4096.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def _median_ms(samples):
    return 1e3 * statistics.median(samples)


def _interleaved(fns: dict, repeats: int, warmup: int) -> dict:
    """Runs every fn `warmup` times, then `repeats` rounds alternating the order; seconds per call."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--Dv", type=int, default=64)
    parser.add_argument("--K", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="OpenMP threads of the core (0 = default)")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    import mlx.core as mx

    import gmattn
    from gmattn import _ext
    from gmattn.mlx import gma_attention

    core = _ext.core()
    B, N, H, D, Dv, K = args.B, args.N, args.H, args.D, args.Dv, args.K
    causal, threads = args.causal, args.threads
    rng = np.random.default_rng(0)
    f32 = np.float32
    host = {
        "q": (rng.standard_normal((B, N, H, D)) * 0.6).astype(f32),
        "k": (rng.standard_normal((B, N, H, D)) * 0.6).astype(f32),
        "v": rng.standard_normal((B, N, H, Dv)).astype(f32),
        "mu": (rng.standard_normal((H, K, D)) * 0.6).astype(f32),
        "omega": np.full((H, K, D), np.log(np.expm1(0.5 * np.sqrt(6 * D) / 3)), f32),
        "alpha": np.zeros((H, K), f32),
    }
    g_np = rng.standard_normal((B, N, H, Dv)).astype(f32)
    names = ("q", "k", "v", "mu", "omega", "alpha")
    dev = {n: mx.array(host[n]) for n in names}
    g_mx = mx.array(g_np)
    mx.eval(list(dev.values()), g_mx)
    opts = dict(causal=causal, eps=1e-6, sigma_eps=1e-4, num_threads=threads, stream=0)

    # ---- the NumPy baseline: the core called directly --------------------------------------
    def np_forward():
        out = np.empty((B, N, H, Dv), f32)
        core.forward(*(host[n] for n in names), None, None, None, out, None, None, None, None, None, **opts)
        return out

    def np_forward_backward():
        out = np.empty((B, N, H, Dv), f32)
        gq, gk = np.empty((B, H, N, K), f32), np.empty((B, H, N, K), f32)
        den = np.empty((B, H, N), f32)
        core.forward(*(host[n] for n in names), None, None, None, out, None, None, gq, gk, den, **opts)
        grads = [np.empty_like(host[n]) for n in names]
        core.backward(*(host[n] for n in names), None, None, None, out, gq, gk, den, g_np, None, None,
                      *grads, None, None, deterministic=True, **opts)
        return grads

    # ---- the MLX front end ---------------------------------------------------------------------
    # A timing proxy around the core measures, inside each MLX call, how long the kernel itself
    # took: (call - kernel) is the front end's own cost, measured in the same call and therefore
    # insensitive to the machine's load, unlike a ratio of two separately timed calls.
    from gmattn.mlx import ops as mlx_ops

    kernel_s = []

    class TimedCore:
        def forward(self, *a, **kw):
            t0 = time.perf_counter()
            core.forward(*a, **kw)
            kernel_s.append(time.perf_counter() - t0)

        def backward(self, *a, **kw):
            core.backward(*a, **kw)

    timed_core = TimedCore()

    def mlx_forward():
        out = gma_attention(*(dev[n] for n in names), causal=causal, num_threads=threads)
        mx.eval(out)
        return out

    def make_mlx_fwd_bwd(save):
        def f(*primals):
            return gma_attention(*primals, causal=causal, num_threads=threads, save_for_backward=save)

        def run():
            outs, grads = mx.vjp(f, [dev[n] for n in names], [g_mx])
            mx.eval(outs, grads)
            return grads

        return run

    # correctness first: both sides compute the same numbers
    np.testing.assert_allclose(np.array(mlx_forward()), np_forward(), rtol=1e-6, atol=1e-6)
    for a, b in zip(make_mlx_fwd_bwd(True)(), np_forward_backward()):
        np.testing.assert_allclose(np.array(a), b, rtol=1e-5, atol=1e-5)

    fwd = _interleaved({"numpy_core": np_forward, "mlx": mlx_forward}, args.repeats, args.warmup)

    real_core = mlx_ops._ext.core
    mlx_ops._ext.core = lambda: timed_core
    try:
        total_s = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            mlx_forward()
            total_s.append(time.perf_counter() - t0)
    finally:
        mlx_ops._ext.core = real_core
    own_ms = [1e3 * (t - k) for t, k in zip(total_s, kernel_s)]
    bwd = _interleaved({"numpy_core": np_forward_backward, "mlx_saved": make_mlx_fwd_bwd(True),
                        "mlx_recompute": make_mlx_fwd_bwd(False)}, max(3, args.repeats // 2), 1)

    # ---- zero copy: views of evaluated mx.arrays, and what one copy costs ------------------------
    q = dev["q"]
    view = np.asarray(q)
    zero_copy = bool(view.ctypes.data == np.asarray(q).ctypes.data and not view.flags.owndata)
    copy_check = np.array(q)  # a real copy, for comparison
    zero_copy = zero_copy and copy_check.ctypes.data != view.ctypes.data
    io = _interleaved({
        "view_q_as_numpy": lambda: np.asarray(q),
        "copy_q_to_numpy": lambda: np.array(q),
        "copy_out_to_mlx": lambda: mx.eval(mx.array(np.empty((B, N, H, Dv), f32))),
    }, args.repeats, 1)

    ms = {k: _median_ms(v) for k, v in fwd.items()}
    ms_min = {k: 1e3 * min(v) for k, v in fwd.items()}
    own = statistics.median(own_ms)
    ms_b = {k: _median_ms(v) for k, v in bwd.items()}
    ms_io = {k: _median_ms(v) for k, v in io.items()}
    ratio_fwd = ms["mlx"] / ms["numpy_core"]
    ratio_bwd = ms_b["mlx_saved"] / ms_b["numpy_core"]
    ratio_rec = ms_b["mlx_recompute"] / ms_b["numpy_core"]

    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"gmattn {gmattn.__version__} core isa={getattr(core, 'isa', '?')}  mlx {mx.__version__}  "
          f"default device {mx.default_device()}  {platform.machine()}  cpus={os.cpu_count()}  "
          f"OMP_NUM_THREADS={omp}  num_threads={threads}")
    print(f"shape B={B} N={N} H={H} D={D} Dv={Dv} K={K}  float32  causal={causal}  "
          f"median of {args.repeats} (fwd) / {max(3, args.repeats // 2)} (fwd+bwd), interleaved")
    print(f"{'':28s}{'NumPy->core ms':>16s}{'MLX ms':>12s}{'ratio':>9s}")
    print(f"{'forward':28s}{ms['numpy_core']:16.2f}{ms['mlx']:12.2f}{ratio_fwd:9.3f}")
    print(f"{'forward (fastest run)':28s}{ms_min['numpy_core']:16.2f}{ms_min['mlx']:12.2f}"
          f"{ms_min['mlx'] / ms_min['numpy_core']:9.3f}")
    print(f"{'forward+backward (saved)':28s}{ms_b['numpy_core']:16.2f}{ms_b['mlx_saved']:12.2f}{ratio_bwd:9.3f}")
    print(f"{'forward+backward (recompute)':28s}{ms_b['numpy_core']:16.2f}{ms_b['mlx_recompute']:12.2f}"
          f"{ratio_rec:9.3f}   (default save_for_backward=False: one extra forward)")
    print(f"inputs zero-copy: {zero_copy}  (view {ms_io['view_q_as_numpy'] * 1e3:.1f} us vs copy "
          f"{ms_io['copy_q_to_numpy']:.2f} ms for q); output copy into MLX {ms_io['copy_out_to_mlx']:.2f} ms")
    print(f"front end's own time per forward (call minus kernel, same call): median {own:.2f} ms "
          f"= {100 * own / ms['numpy_core']:.1f}% of the NumPy->core forward")
    verdict = "PASS" if ratio_fwd <= 1.10 else "FAIL"
    print(f"forward overhead {100 * (ratio_fwd - 1):+.1f}% (ratio of medians; bar: <= +10%)  {verdict}")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({
                "shape": dict(B=B, N=N, H=H, D=D, Dv=Dv, K=K), "dtype": "float32", "causal": causal,
                "threads": threads, "omp_num_threads": omp, "cpus": os.cpu_count(), "machine": platform.machine(),
                "mlx": mx.__version__, "median_ms": {"forward": ms, "forward_backward": ms_b, "io": ms_io},
                "min_ms": {"forward": ms_min}, "front_end_own_ms_median": own,
                "ratio_forward": ratio_fwd, "ratio_forward_backward_saved": ratio_bwd,
                "ratio_forward_backward_recompute": ratio_rec, "inputs_zero_copy": zero_copy,
            }, fh, indent=2)
    return 0 if ratio_fwd <= 1.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
