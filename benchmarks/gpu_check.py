"""One script for a GPU machine: (a) the CUDA correctness suite against the float64 reference,
(b) forward+backward timings against torch SDPA, (c) achieved TFLOP/s and GB/s.

    python benchmarks/gpu_check.py                 # everything, under 5 minutes on an H100/H200
    python benchmarks/gpu_check.py --skip-tests    # timings only
    python benchmarks/gpu_check.py --out DIR       # also writes DIR/gpu_check.json

Shapes: B=1, H=16, D=Dv=64, K=64, bfloat16, N in {1k, 4k, 16k, 64k}, causal and
bidirectional. Every figure is a median over repeats measured with CUDA events, side by side
with SDPA in the same run.

Flop count (the algorithm's useful work, per batch row and head, multiply-add = 2 flops):
  routing q and k          2 * (2 N K D)          the two quadratic-form products per path
  write S = Gk^T V, z      2 N K Dv
  read Gq S, Gq z          2 N K Dv
  causal intra-chunk       2 N C K + 2 N C Dv     (chunk C=64: tril(Gq Gk^T) and A V, counted full)
Backward is counted as 2x forward (the usual convention; it recomputes and multiplies twice as
much). SDPA flops: 4 N^2 D (bidirectional), half that causal; backward 2.5x forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import gmattn  # noqa: E402

CHUNK = 64


def gma_flops(B, N, H, K, D, Dv, causal):
    f = 2 * (2 * N * K * D) + 2 * N * K * Dv + 2 * N * K * Dv
    if causal:
        f += 2 * N * CHUNK * K + 2 * N * CHUNK * Dv
    return B * H * f


def sdpa_flops(B, N, H, D, causal):
    f = 4 * N * N * D * B * H
    return f / 2 if causal else f


def time_cuda(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def bench(N, causal, B=1, H=16, D=64, K=64, dtype=torch.bfloat16, repeats=5):
    dev = "cuda"
    q = torch.randn(B, N, H, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, N, H, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, N, H, D, device=dev, dtype=dtype, requires_grad=True)
    mu = torch.randn(H, K, D, device=dev, requires_grad=True)
    omega = torch.full((H, K, D), 2.0, device=dev, requires_grad=True)
    alpha = torch.zeros(H, K, device=dev, requires_grad=True)
    dout = torch.randn(B, N, H, D, device=dev, dtype=dtype)

    def gma_fwd():
        with torch.no_grad():
            gmattn.gma_attention(q, k, v, mu, omega, alpha, causal=causal)

    def gma_fwd_bwd():
        out = gmattn.gma_attention(q, k, v, mu, omega, alpha, causal=causal)
        torch.autograd.grad(out, (q, k, v, mu, omega, alpha), dout)

    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    doutt = dout.transpose(1, 2).contiguous()

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def sdpa_fwd_bwd():
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        torch.autograd.grad(out, (qt, kt, vt), doutt)

    res = {"N": N, "causal": causal, "B": B, "H": H, "D": D, "Dv": D, "K": K, "dtype": str(dtype)}
    for name, fn in (("gma_fwd", gma_fwd), ("gma_fwd_bwd", gma_fwd_bwd), ("sdpa_fwd", sdpa_fwd),
                     ("sdpa_fwd_bwd", sdpa_fwd_bwd)):
        try:
            res[name] = time_cuda(fn, repeats)
        except torch.OutOfMemoryError:
            res[name] = None
            torch.cuda.empty_cache()
    fl = gma_flops(B, N, H, K, D, D, causal)
    res["gma_fwd_tflops"] = fl / res["gma_fwd"] / 1e12
    res["gma_fwd_bwd_tflops"] = 3 * fl / res["gma_fwd_bwd"] / 1e12
    elem = torch.finfo(dtype).bits // 8
    io_fwd = (3 * B * N * H * D + B * N * H * D) * elem  # q, k, v read; out written
    io_bwd = io_fwd + 4 * B * N * H * D * elem + 2 * B * H * N * K * 4  # + dout, dq, dk, dv, saved Gq/Gk
    res["gma_fwd_gbs"] = io_fwd / res["gma_fwd"] / 1e9
    res["gma_fwd_bwd_gbs"] = io_bwd / res["gma_fwd_bwd"] / 1e9
    if res["sdpa_fwd_bwd"]:
        res["speedup_fwd_bwd"] = res["sdpa_fwd_bwd"] / res["gma_fwd_bwd"]
        res["speedup_fwd"] = res["sdpa_fwd"] / res["gma_fwd"]
    return res


def matmul_peak(dtype=torch.bfloat16, n=8192):
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = time_cuda(lambda: a @ b, 10)
    return 2 * n**3 / t / 1e12


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--sizes", default="1024,4096,16384,65536")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch; nothing to do")
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  gmattn {gmattn.__version__}")
    t0 = time.time()
    status = 0
    if not args.skip_tests:
        env = dict(os.environ, GMATTN_REQUIRE_CUDA_MODULE="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", str(REPO / "tests" / "test_cuda.py")],
                           env=env, cwd=REPO)
        status = r.returncode
        print(f"(a) CUDA correctness suite: {'PASSED' if status == 0 else 'FAILED'} ({time.time() - t0:.0f} s)")
    peak = matmul_peak()
    print(f"dense bf16 matmul 8192^3: {peak:.0f} TFLOP/s")
    rows = []
    header = (f"{'N':>6} {'mode':>6} | {'gma fwd':>9} {'sdpa fwd':>9} {'x':>6} | {'gma f+b':>9} {'sdpa f+b':>9} "
              f"{'x':>6} | {'TFLOP/s f+b':>11} {'% mm':>5} {'GB/s f+b':>9}")
    print(header)
    for N in [int(s) for s in args.sizes.split(",")]:
        for causal in (True, False):
            r = bench(N, causal, repeats=args.repeats)
            rows.append(r)

            def ms(x):
                return f"{x * 1e3:8.2f}m" if x else "     OOM "

            print(f"{N:>6} {'causal' if causal else 'bidir':>6} | {ms(r['gma_fwd'])} {ms(r['sdpa_fwd'])} "
                  f"{r.get('speedup_fwd', float('nan')):6.2f} | {ms(r['gma_fwd_bwd'])} {ms(r['sdpa_fwd_bwd'])} "
                  f"{r.get('speedup_fwd_bwd', float('nan')):6.2f} | {r['gma_fwd_bwd_tflops']:11.1f} "
                  f"{100 * r['gma_fwd_bwd_tflops'] / peak:5.1f} {r['gma_fwd_bwd_gbs']:9.0f}")
    print(f"total {time.time() - t0:.0f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "gpu_check.json", "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "matmul_tflops": peak, "rows": rows,
                       "tests_passed": status == 0}, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
