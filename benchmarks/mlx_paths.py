"""The two MLX backends of gma_attention side by side: the MLX-native path and the compiled CPU core.

Both run in one process on the same arrays, interleaved (A B B A ...), and the script prints the
medians and the ratio native / core for:

* forward:            gma_attention(...) then mx.eval(out)
* forward + backward: mx.value_and_grad of sum(out * g) with respect to q, k, v, mu, omega, alpha
                      (the core with save_for_backward=True, as the layer does in training)
* the native path under mx.compile (forward, and forward + backward), which the core cannot run

    python benchmarks/mlx_paths.py                          # B=1 N=4096 H=8 D=Dv=64 K=64 float32
    python benchmarks/mlx_paths.py --causal --N 16384 --json out.json

On Linux (mlx[cpu]) both run on the CPU; on a Mac with the GPU as MLX's default device the native
path runs on the GPU (pass --device cpu to compare both on the CPU there).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import numpy as np
from mlx_overhead import _interleaved  # this directory is on sys.path when run as a script


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("B", 1), ("N", 4096), ("H", 8), ("D", 64), ("Dv", 64), ("K", 64)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--device", default=None, choices=("cpu", "gpu"), help="MLX default device")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--matmul", type=int, default=1024, help="size of the square matmul timed for reference")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    import mlx.core as mx

    from gmattn.mlx import gma_attention

    if args.device is not None:
        mx.set_default_device(mx.cpu if args.device == "cpu" else mx.gpu)
    B, N, H, D, Dv, K = args.B, args.N, args.H, args.D, args.Dv, args.K
    dtype = getattr(mx, args.dtype)
    mx.random.seed(0)
    q, k = (0.7 * mx.random.normal((B, N, H, D))).astype(dtype), (0.7 * mx.random.normal((B, N, H, D))).astype(dtype)
    v = mx.random.normal((B, N, H, Dv)).astype(dtype)
    mu, omega, alpha = 0.6 * mx.random.normal((H, K, D)), 0.5 + 0.3 * mx.random.normal((H, K, D)), mx.zeros((H, K))
    g = mx.random.normal((B, N, H, Dv)).astype(dtype)
    primals = [q, k, v, mu, omega, alpha]
    mx.eval(primals, g)

    def forward(backend):
        return lambda *p: gma_attention(*p, causal=args.causal, backend=backend, save_for_backward=True)

    def loss_and_grads(backend):
        fwd = forward(backend)
        return mx.value_and_grad(lambda *p: (fwd(*p) * g).astype(mx.float32).sum(), argnums=list(range(6)))

    def timed(fn):
        return lambda: mx.eval(fn(*primals))

    fns = {
        "forward native": timed(forward("native")),
        "forward core": timed(forward("core")),
        "forward native compiled": timed(mx.compile(forward("native"))),
        "fwd+bwd native": timed(loss_and_grads("native")),
        "fwd+bwd core": timed(loss_and_grads("core")),
        "fwd+bwd native compiled": timed(mx.compile(loss_and_grads("native"))),
    }
    # What the native path is made of: MLX's float32 matmul on the default device, against NumPy's
    # (the native path's speed follows the BLAS that MLX was built with).
    m = args.matmul
    a = mx.random.normal((m, m))
    a_np = np.random.default_rng(0).standard_normal((m, m)).astype(np.float32)
    mx.eval(a)
    fns["matmul MLX"] = lambda: mx.eval(a @ a)
    fns["matmul NumPy"] = lambda: a_np @ a_np
    times = _interleaved(fns, args.repeats, args.warmup)
    ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    shape = f"B={B} N={N} H={H} D={D} Dv={Dv} K={K} {args.dtype} {'causal' if args.causal else 'bidirectional'}"
    print(f"gma_attention on MLX, {shape}, device {mx.default_device()}, {platform.machine()}")
    print(f"medians of {args.repeats} interleaved runs (ms); ratio = native / core (< 1: native faster)")
    for part in ("forward", "fwd+bwd"):
        native, core, compiled = ms[f"{part} native"], ms[f"{part} core"], ms[f"{part} native compiled"]
        print(f"  {part:8s} native {native:9.2f}   core {core:9.2f}   ratio {native / core:5.2f}   "
              f"native compiled {compiled:9.2f} (ratio {compiled / core:5.2f})")
    gflops = {n: 2 * m ** 3 / (ms[f"matmul {n}"] * 1e6) for n in ("MLX", "NumPy")}
    print(f"  float32 matmul {m}^3: MLX {gflops['MLX']:.1f} GFLOP/s, NumPy {gflops['NumPy']:.1f} GFLOP/s "
          f"(ratio {gflops['MLX'] / gflops['NumPy']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "device": str(mx.default_device()), "median_ms": ms, "matmul_gflops": gflops},
                      f, indent=2)


if __name__ == "__main__":
    main()
