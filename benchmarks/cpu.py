"""CPU benchmark of the compiled GMA core: speed, achieved GFLOP/s, scaling, threads and memory.

The developer benchmark of the CPU core. One run measures, side by side on the same machine:

  speed   B=1, H=8, D=Dv=64, K=64, float32, N in {1024, 4096, 16384}, forward and
           forward+backward, causal and bidirectional: the core (gmattn.gma_attention) against
           gmattn.reference.chunked_gma (the best plain-PyTorch implementation of the same math)
           and against torch's scaled_dot_product_attention (SDPA), as ratios of medians.
  matmul   a 4096 x 4096 float32 torch.matmul, the machine's reference arithmetic rate (it also
           joins the round-robin of the speed cells at the largest N, for the fraction target); the
           core's achieved GFLOP/s (flop count below) as a fraction of it.
  scaling  core time per token from N=4096 to N=262144 (flat = linear time); the lengths of a
           mode run in one round-robin of five rounds, each length's turn lasting at least
           0.25 s (short calls timed several times back to back, each call a sample).
  shapes   K in {16, 64, 256} x D=Dv in {32, 64, 128}: core against chunked, GFLOP/s, and
           K=256 at two lengths (linear time).
  threads  1 thread against all threads (torch.set_num_threads; the torch front end passes
           torch.get_num_threads() to the core), for B*H=8 and for B*H=1 (chunk-parallel scan),
           next to the same scaling of a 2048^3 torch.matmul (the machine's own); all of
           these cells and both thread counts in one round-robin of eight rounds.
  memory   peak resident memory of forward+backward (causal) in a fresh subprocess, against the
           bytes of inputs + outputs + their gradients.

Timing. Every cell runs its implementations round-robin (A B C A B C ...) on the same inputs, so a
load change on a shared machine hits all of them alike, and reports the median of the repeats
(a warm-up call first; calls that take more than 5 s count their first call as a repeat instead).
In the speed, shapes, threads and scaling sections an implementation's turn in a round lasts at
least 0.3, 0.3, 0.6 and 0.25 s: short calls are timed several times back to back, each call a sample, so
their medians rest on many calls (this VM runs at two speeds, up to 2x apart, from one moment to
the next).
forward = one call under torch.no_grad(); forward+backward = one call with inputs that require grad
followed by out.backward(g) with a fixed random g (gradients of q, k, v and, for GMA, of mu, omega,
alpha). SDPA gets its natural (B, H, N, D) layout; GMA and the chunked reference get (B, N, H, D).

Flop count (flops of the algorithm the core runs, per token and head; a multiply-add is 2 flops;
O(N K) softmax/exp/normalisation work is not counted). C=64 is the chunk, and only the lower
triangle of the intra-chunk products is counted (the kernels skip most of the upper one):
  responsibilities of q and k, Q = sum_d (a x' - b)^2: two multiply-adds per (k, d) each: 8 D K
  forward, bidirectional:  8 D K + 4 K Dv                    (S = Gk^T V, read Gq S)
  forward, causal:         8 D K + 4 K Dv + (K + Dv)(C + 1)  (+ A = tril(Gq Gk^T), A V)
  backward, bidirectional: 14 D K + 10 K Dv                  (density backward in the direct
                           form, 7 flops per (k, d) per path; S, dS sums; dGq, dGk, dv products)
  backward, causal:        14 D K + 8 K Dv + 3 (K + Dv)(C + 1)
forward+backward counts the forward (which also saves Gq, Gk, den) plus the backward.

Memory. The worker subprocess runs a small warm-up, then reads VmRSS (baseline), writes "5" to
/proc/self/clear_refs (which resets the high-water mark VmHWM to the current RSS), allocates the
inputs, runs forward and backward, and reads VmHWM: peak = VmHWM - baseline, everything the step
needed (inputs, saved activations, outputs, gradients, temporaries). It is compared with the bytes
of inputs + output + gradient of the output + gradients of the inputs.

    python benchmarks/cpu.py                      # full run (~15 min on 2 cores)
    python benchmarks/cpu.py --quick              # tiny sizes, seconds (smoke test)
    python benchmarks/cpu.py --sections speed,memory --out /tmp/cpu-bench
    python benchmarks/cpu.py --report /tmp/cpu-bench/results.json   # redraw plots and tables only
    python benchmarks/cpu.py --targets            # developer mode: also the targets, met or missed

(For a user's first look, benchmarks/compare.py is the short comparison with a verdict.)

Writes <out>/results.json, <out>/results.md (the tables), <out>/time_vs_n.png, <out>/matmul_fraction.png, <out>/memory_vs_n.png
(default out: benchmarks/results/cpu).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

SECTIONS = ("short", "speed", "matmul", "scaling", "shapes", "threads", "memory")
CHUNK = 64  # the core's chunk length (cpp/cpu/rows.h kChunk)

# ----------------------------------------------------------------------------------------------
# Flop count of the core's algorithm (see the module docstring)
# ----------------------------------------------------------------------------------------------


def matmul_reference_gflops(results: dict, row: dict):
    """The matmul rate a row's GFLOP/s is compared with: the matmul timed in the same rounds as the
    row (speed cells at the largest N), else the matmul section's; None without either."""
    return row.get("matmul_gflops", results.get("matmul", {}).get("gflops"))


def core_flops(B: int, N: int, H: int, K: int, D: int, Dv: int, causal: bool, backward: bool) -> float:
    fwd = 8 * D * K + 4 * K * Dv + ((K + Dv) * (CHUNK + 1) if causal else 0)
    bwd = (14 * D * K + 8 * K * Dv + 3 * (K + Dv) * (CHUNK + 1)) if causal else (14 * D * K + 10 * K * Dv)
    per_token = fwd + (bwd if backward else 0)
    return float(B) * N * H * per_token


# ----------------------------------------------------------------------------------------------
# Machine description
# ----------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import torch

    import gmattn
    from gmattn import _ext

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    isa_flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "cpu_flags": isa_flags,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gmattn": gmattn.__version__,
        "core_isa": getattr(_ext.core(), "isa", "?"),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# ----------------------------------------------------------------------------------------------
# Inputs and the implementations under test
# ----------------------------------------------------------------------------------------------


def gma_inputs(B, N, H, K, D, Dv, requires_grad, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g)
    k = torch.randn(B, N, H, D, generator=g)
    v = torch.randn(B, N, H, Dv, generator=g)
    mu = 0.5 * torch.randn(H, K, D, generator=g)
    omega = torch.randn(H, K, D, generator=g) * 0.3 + 1.0
    alpha = torch.randn(H, K, generator=g)
    ts = [q, k, v, mu, omega, alpha]
    if requires_grad:
        for t in ts:
            t.requires_grad_(True)
    return ts


def sdpa_inputs(B, N, H, D, Dv, requires_grad, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g),
          torch.randn(B, H, N, Dv, generator=g)]
    if requires_grad:
        for t in ts:
            t.requires_grad_(True)
    return ts


def make_call(impl: str, B, N, H, K, D, Dv, causal: bool, backward: bool) -> Callable[[], None]:
    """A zero-argument callable running one forward (or forward+backward) of `impl`."""
    import torch
    import torch.nn.functional as F

    import gmattn
    from gmattn.reference import chunked_gma

    if impl == "sdpa":
        ins = sdpa_inputs(B, N, H, D, Dv, backward)

        def fn():
            return F.scaled_dot_product_attention(*ins, is_causal=causal)
    else:
        ins = gma_inputs(B, N, H, K, D, Dv, backward)
        op = gmattn.gma_attention if impl == "core" else chunked_gma

        def fn():
            return op(*ins, causal=causal)

    if not backward:
        def call():
            with torch.no_grad():
                fn()
        return call

    gout = torch.randn(B, H, N, Dv) if impl == "sdpa" else torch.randn(B, N, H, Dv)

    def call_bwd():
        for t in ins:
            t.grad = None
        fn().backward(gout)

    return call_bwd


def run_cell(calls: Dict[str, Callable[[], None]], repeats: int, progress=None,
             min_seconds: float = 0.0, warmup: bool = True) -> Dict[str, List[float]]:
    """Round-robin timing of several callables; returns the wall times (s) of each. With
    `min_seconds`, a callable's turn in a round lasts that long: short calls are timed several
    times back to back, each call a sample. `warmup=False` when the caller already ran each once."""
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for name, call in (calls.items() if warmup else ()):  # warm-up; a slow first call counts as a repeat
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        if dt > 5.0:
            times[name].append(dt)
        if progress is not None:
            progress.update(1)
    rounds = {name: len(times[name]) for name in calls}  # a slow warm-up counted as a round
    for _ in range(repeats):
        for name, call in calls.items():
            if rounds[name] >= repeats:
                continue
            rounds[name] += 1
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                times[name].append(t1 - t0)
                if t1 - start >= min_seconds:
                    break
            if progress is not None:
                progress.update(1)
    return times


def med(xs: List[float]) -> float:
    return statistics.median(xs)


# ----------------------------------------------------------------------------------------------
# Memory worker (runs in a subprocess)
# ----------------------------------------------------------------------------------------------


def memory_worker(spec: dict) -> dict:
    import ctypes

    import torch

    from gmattn.bench import proc_status_kib

    torch.set_num_threads(spec["threads"])
    B, N, H, K, D, Dv = (spec[x] for x in ("B", "N", "H", "K", "D", "Dv"))
    causal, impl = spec["causal"], spec["impl"]
    # warm-up: load every library and lazy state before the baseline
    make_call(impl, 1, 64, H, K, D, Dv, causal, True)()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs=5, minus VmRSS before the inputs"
    except OSError:
        method = "unavailable"
    call = make_call(impl, B, N, H, K, D, Dv, causal, True)  # allocates inputs and g
    call()
    peak = proc_status_kib("VmHWM")
    elem = 4
    n_in = B * N * H * (2 * D + Dv) + H * K * (2 * D + 1)
    n_out = B * N * H * Dv
    io_bytes = elem * (2 * n_in + 2 * n_out)  # inputs + grads, output + its gradient
    return {
        **spec,
        "method": method,
        "baseline_bytes": None if base is None else base * 1024,
        "peak_bytes": None if (peak is None or base is None) else (peak - base) * 1024,
        "io_bytes": io_bytes,
    }


def measure_memory(spec: dict) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {**spec, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, quick: bool, out: str):
        import torch

        self.quick = quick
        self.out = out
        self.torch = torch
        self.nthreads = torch.get_num_threads()
        self.results: dict = {"machine": machine_info(), "quick": quick}
        self.results["flop_count"] = __doc__[__doc__.index("Flop count"):__doc__.index("Memory.")].strip()
        if quick:
            self.H, self.D, self.K = 2, 16, 16
        else:
            self.H, self.D, self.K = 8, 64, 64

    # -- helpers --------------------------------------------------------------------------------
    def _progress(self, total, desc):
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            return None

    @staticmethod
    def _close(p):
        if p is not None:
            p.close()

    # -- short sequences: the fixed cost of a call ------------------------------------------------
    def short(self):
        """Short sequences and the one-token step, where the fixed cost of a call decides: GMA
        against causal SDPA at N = 1 ... 512 (B=1, H=8, D=Dv=K=64, float32), the fixed cost of an
        N = 1 call taken apart, a small byte-LM training step with GMA and with softmax, and the
        one-token decoding step (benchmarks/decode.py's measurement)."""
        import decode  # benchmarks/decode.py, next to this file

        H, D, K = 8, 64, 64  # the shape the targets are stated for, also with --quick
        Ns = (1, 64) if self.quick else (1, 64, 256, 512)
        reps, turn = (2, 0.05) if self.quick else (7, 0.3)
        rows = []
        p = self._progress(len(Ns) * 2 * (reps + 1), "short sequences")
        for N in Ns:
            for bwd in (False, True):
                calls = {impl: make_call(impl, 1, N, H, K, D, D, True, bwd) for impl in ("core", "sdpa")}
                times = run_cell(calls, reps, p, min_seconds=turn)
                rows.append({"N": N, "mode": "fwd+bwd" if bwd else "fwd", "core_s": med(times["core"]),
                             "sdpa_s": med(times["sdpa"]), "core_over_sdpa": med(times["core"]) / med(times["sdpa"])})
        self._close(p)
        fixed = self._fixed_cost(H, D, K, reps, turn)
        lm = self._byte_lm_step(2 if self.quick else 5, 0.0 if self.quick else 1.0)
        step = decode.op_step_times(2 if self.quick else 7, 20 if self.quick else 100)
        self.results["short"] = {"B": 1, "H": H, "D": D, "Dv": D, "K": K, "dtype": "float32", "causal": True,
                                 "threads": self.nthreads, "rows": rows, "fixed_cost": fixed, "byte_lm": lm,
                                 "step": step}

    def _fixed_cost(self, H, D, K, reps, turn) -> dict:
        """An N = 1 causal call taken apart, every piece timed in one round-robin: the argument
        checks, the front end (no grad; and forward+backward), the custom op, the compiled core
        called directly on NumPy views with outputs allocated beforehand (at this shape, and at
        H = K = D = 1, where the kernel has next to nothing to do: the binding's own cost), and the
        core's backward."""
        import numpy as np

        torch = self.torch
        from gmattn import _checks, _ext
        from gmattn.torch import ops

        core, nt = _ext.core(), self.nthreads
        q, k, v, mu, omega, alpha = gma_inputs(1, 1, H, K, D, D, False)
        tiny = gma_inputs(1, 1, 1, 1, 1, 1, False)

        def core_forward(q, k, v, mu, omega, alpha):
            # NumPy views, every argument by position: the module's own cost, without torch's
            # export of its tensors or pybind11's matching of keywords
            arrays = [t.numpy() for t in (q, k, v, mu, omega, alpha)]
            out = np.empty_like(arrays[2])
            return lambda: core.forward(*arrays, None, None, None, out, None, None, None, None, None, True, 1e-6,
                                        1e-4, nt, 0, None)

        # What the backward reads: the forward's saved responsibilities and denominators.
        B_, N_ = 1, 1
        gq, gk = torch.empty(B_, H, N_, K), torch.empty(B_, H, N_, K)
        den, out = torch.empty(B_, H, N_), torch.empty_like(v)
        core.forward(q, k, v, mu, omega, alpha, None, None, None, out, None, None, gq, gk, den, causal=True,
                     eps=1e-6, sigma_eps=1e-4, num_threads=nt)
        dout = torch.randn_like(v)
        grads = [torch.empty_like(t) for t in (q, k, v, mu, omega, alpha)]

        saved = [t.numpy() for t in (q, k, v, mu, omega, alpha, out, gq, gk, den, dout, *grads)]

        def core_backward():
            core.backward(*saved[:6], None, None, None, *saved[6:11], None, None, *saved[11:], None, None, True, 1e-6,
                          1e-4, nt, 0, True, None, None, None)

        def front_end():
            with torch.no_grad():
                ops.gma_attention(q, k, v, mu, omega, alpha, causal=True)

        def custom_op():
            with torch.no_grad():
                torch.ops.gmattn.forward(q, k, v, mu, omega, alpha, None, None, None, True, 1e-6, 1e-4, False, False)

        class NoKernel(torch.autograd.Function):
            """What torch's autograd alone costs a call of these tensors: no kernel, gradients of
            the right shapes (the floor of any torch op's forward+backward)."""

            @staticmethod
            def forward(ctx, *tensors):
                ctx.save_for_backward(*tensors)
                return torch.empty_like(tensors[2])

            @staticmethod
            def backward(ctx, g):
                return tuple(torch.empty_like(t) for t in ctx.saved_tensors)

        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, mu, omega, alpha)]

        def autograd_alone():
            NoKernel.apply(*leaves).backward(dout)

        calls = {
            "argument checks": lambda: _checks.check_arguments(q, k, v, mu, omega, alpha, None, None, 1e-6, 1e-4),
            "front end, forward": front_end,
            "custom op, forward": custom_op,
            "core forward, NumPy arrays": core_forward(q, k, v, mu, omega, alpha),
            "core forward, NumPy arrays, H=K=D=1": core_forward(*tiny),
            "core backward, NumPy arrays": core_backward,
            "front end, forward+backward": make_call("core", 1, 1, H, K, D, D, True, True),
            "torch autograd alone, forward+backward (no kernel)": autograd_alone,
        }
        p = self._progress(len(calls) * (reps + 1), "fixed cost")
        times = run_cell(calls, reps, p, min_seconds=turn)
        self._close(p)
        return {name: med(ts) for name, ts in times.items()}

    def _byte_lm_step(self, reps, turn) -> dict:
        """A training step (forward, cross-entropy, backward, AdamW) of a small byte LM built by
        gmattn.build_model (d_model 128, 4 heads, 2 layers, causal; GMA with K = 32) on B = 16
        sequences of N = 256 bytes, GMA against softmax attention, round-robin."""
        torch = self.torch
        import gmattn

        B, N = (4, 64) if self.quick else (16, 256)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 256, (B, N + 1), generator=g)
        calls = {}
        for kind in ("gma", "softmax"):
            torch.manual_seed(0)
            model = gmattn.build_model({"kind": kind, "d_model": 128, "num_heads": 4, "causal": True, "seed": 0,
                                        "num_components": 32}, vocab_size=256, num_layers=2)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                logits = model(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
                loss.backward()
                opt.step()

            calls[kind] = step
        p = self._progress(len(calls) * (reps + 1), "byte-LM step")
        times = run_cell(calls, reps, p, min_seconds=turn)
        self._close(p)
        return {"B": B, "N": N, "d_model": 128, "num_layers": 2, "num_heads": 4, "num_components": 32,
                **{f"{kind}_s": med(ts) for kind, ts in times.items()}}

    # -- speed: the core, chunked PyTorch and SDPA side by side -----------------------------------
    def speed(self):
        Ns = (64, 128) if self.quick else (1024, 4096, 16384)
        H, D, K = self.H, self.D, self.K
        impls = ("core", "chunked", "sdpa")
        cells = [(N, causal, bwd) for N in Ns for causal in (True, False) for bwd in (False, True)]
        rows = []
        reps = lambda N: 2 if self.quick else (3 if N >= 16384 else 5)  # noqa: E731
        turn = 0.0 if self.quick else 0.3  # s: short calls repeat within their turn (run_cell)
        # At the largest N the matmul of the reference rate joins each cell's round-robin, so the
        # core's fraction of it is a ratio measured side by side like the others (the load of a
        # shared machine drifts between sections).
        n_mm = self.matmul_n()
        mm_a, mm_b = self.torch.randn(n_mm, n_mm), self.torch.randn(n_mm, n_mm)
        with_mm = lambda N: N == max(Ns)  # noqa: E731
        p = self._progress(sum((reps(N) + 1) * (len(impls) + with_mm(N)) for N, _, _ in cells), "speed")
        for N, causal, bwd in cells:
            calls = {impl: make_call(impl, 1, N, H, K, D, D, causal, bwd) for impl in impls}
            if with_mm(N):
                calls["matmul"] = lambda: self.torch.matmul(mm_a, mm_b)
            times = run_cell(calls, reps(N), p, min_seconds=turn)
            del calls
            gc.collect()
            r = {"N": N, "causal": causal, "mode": "fwd+bwd" if bwd else "fwd"}
            for impl in impls:
                r[f"{impl}_s"] = med(times[impl])
                r[f"{impl}_all_s"] = times[impl]
            r["chunked_over_core"] = r["chunked_s"] / r["core_s"]
            r["sdpa_over_core"] = r["sdpa_s"] / r["core_s"]
            r["core_gflops"] = core_flops(1, N, H, K, D, D, causal, bwd) / r["core_s"] / 1e9
            if with_mm(N):
                r["matmul_n"], r["matmul_s"] = n_mm, med(times["matmul"])
                r["matmul_gflops"] = 2.0 * n_mm ** 3 / r["matmul_s"] / 1e9
            rows.append(r)
        self._close(p)
        self.results["speed"] = {"B": 1, "H": H, "D": D, "Dv": D, "K": K, "dtype": "float32", "rows": rows}

    # -- matmul reference rate ------------------------------------------------------------------
    def matmul_n(self):
        return 256 if self.quick else 4096

    def matmul(self):
        torch = self.torch
        n = self.matmul_n()
        a, b = torch.randn(n, n), torch.randn(n, n)
        times = run_cell({"matmul": lambda: torch.matmul(a, b)}, 2 if self.quick else 7)["matmul"]
        t = med(times)
        self.results["matmul"] = {"n": n, "seconds": t, "gflops": 2.0 * n ** 3 / t / 1e9, "all_s": times}

    # -- scaling in N ---------------------------------------------------------------------------------
    def scaling(self):
        Ns = (256, 1024, 4096) if self.quick else (4096, 16384, 65536, 262144)
        H, D, K = self.H, self.D, self.K
        rows = []
        modes = [(causal, bwd) for causal in (True, False) for bwd in (False, True)]
        reps = 2 if self.quick else 5
        p = self._progress(len(modes) * len(Ns) * (reps + 1), "scaling")
        for causal, bwd in modes:
            # every length of a mode in one round-robin: a load change hits them all alike; a
            # length's turn in a round lasts 0.25 s at least (several calls of the short ones), so
            # that the medians of the short cells rest on many samples, not on three
            calls = {N: make_call("core", 1, N, H, K, D, D, causal, bwd) for N in Ns}
            times = run_cell(calls, reps, p, min_seconds=0.0 if self.quick else 0.25)
            del calls
            gc.collect()
            for N in Ns:
                t = med(times[N])
                rows.append({"N": N, "causal": causal, "mode": "fwd+bwd" if bwd else "fwd", "core_s": t,
                             "all_s": times[N], "us_per_token": 1e6 * t / N,
                             "core_gflops": core_flops(1, N, H, K, D, D, causal, bwd) / t / 1e9})
        rows.sort(key=lambda x: (x["N"], not x["causal"], x["mode"]))
        self._close(p)
        self.results["scaling"] = {"B": 1, "H": H, "D": D, "K": K, "rows": rows}

    # -- K x D table ------------------------------------------------------------------------------------
    def shapes(self):
        N = 256 if self.quick else 4096
        Ks = (4, 16) if self.quick else (16, 64, 256)
        Ds = (8, 16) if self.quick else (32, 64, 128)
        H = self.H
        rows = []
        cells = [(K, D, bwd) for K in Ks for D in Ds for bwd in (False, True)]
        reps = 2 if self.quick else 3
        turn = 0.0 if self.quick else 0.3  # s: short calls repeat within their turn (run_cell)
        p = self._progress(len(cells) * 2 * (reps + 1) + 4 * (reps + 1), "shapes")
        for K, D, bwd in cells:
            calls = {impl: make_call(impl, 1, N, H, K, D, D, True, bwd) for impl in ("core", "chunked")}
            times = run_cell(calls, reps, p, min_seconds=turn)
            del calls
            t = med(times["core"])
            rows.append({"K": K, "D": D, "Dv": D, "N": N, "causal": True, "mode": "fwd+bwd" if bwd else "fwd",
                         "core_s": t, "chunked_s": med(times["chunked"]),
                         "chunked_over_core": med(times["chunked"]) / t,
                         "core_gflops": core_flops(1, N, H, K, D, D, True, bwd) / t / 1e9})
        # the largest K at 4x the length: linear time means the same time per token (both lengths
        # of a mode in one round-robin, like the scaling section)
        lin = []
        Kmax, Dmid = Ks[-1], Ds[len(Ds) // 2]
        for bwd in (False, True):
            calls = {n: make_call("core", 1, n, H, Kmax, Dmid, Dmid, True, bwd) for n in (N, 4 * N)}
            times = run_cell(calls, reps, p, min_seconds=turn)
            del calls
            for n, ts in times.items():
                lin.append({"K": Kmax, "D": Dmid, "N": n, "mode": "fwd+bwd" if bwd else "fwd",
                            "core_s": med(ts), "us_per_token": 1e6 * med(ts) / n})
        lin.sort(key=lambda x: (x["N"], x["mode"]))
        self._close(p)
        self.results["shapes"] = {"H": H, "rows": rows, "linearity": lin}

    # -- threads ------------------------------------------------------------------------------------------
    def threads(self):
        torch = self.torch
        tmax = self.nthreads
        configs = [(8, 256), (1, 1024)] if self.quick else [(8, 16384), (1, 65536)]  # (H, N)
        D, K = self.D, self.K
        rows = []
        reps = 2 if self.quick else 8
        turn = 0.0 if self.quick else 0.6  # s: short calls repeat within their turn (run_cell)
        # Every cell's two thread counts and the matmul's in one round-robin (1, tmax, 1, tmax, ...
        # for each in turn), so each ratio samples the same stretches of time: on a shared VM a
        # busy second core can last seconds, and cells timed one after the other saw different ones.
        n = 512 if self.quick else 2048
        a, b = torch.randn(n, n), torch.randn(n, n)

        def with_threads(nt, call):
            def run():
                torch.set_num_threads(nt)
                call()
            return run

        # The machine's own 1 -> tmax scaling on dense arithmetic, for reference: a float32
        # torch.matmul (a shared VM's second core is rarely worth a full core).
        cells = {"matmul": lambda: torch.matmul(a, b)}
        for H, N in configs:
            for bwd in (False, True):
                cells[(H, N, bwd)] = make_call("core", 1, N, H, K, D, D, True, bwd)
        calls = {(cell, nt): with_threads(nt, call) for cell, call in cells.items() for nt in (1, tmax)}
        p = self._progress(len(calls) * (reps + 1), "threads")
        try:
            times = run_cell(calls, reps, p, min_seconds=turn)
        finally:
            torch.set_num_threads(tmax)
            self._close(p)
        res = {key: med(ts) for key, ts in times.items()}
        self.results["threads_matmul"] = {"n": n, "threads": tmax, "t1_s": res[("matmul", 1)],
                                          f"t{tmax}_s": res[("matmul", tmax)],
                                          "speedup": res[("matmul", 1)] / res[("matmul", tmax)]}
        for H, N in configs:
            for bwd in (False, True):
                t1, tn = res[((H, N, bwd), 1)], res[((H, N, bwd), tmax)]
                rows.append({"B": 1, "H": H, "N": N, "causal": True, "mode": "fwd+bwd" if bwd else "fwd",
                             "t1_s": t1, f"t{tmax}_s": tn, "threads": tmax, "speedup": t1 / tn})
        self.results["threads"] = {"rows": rows}

    # -- memory ---------------------------------------------------------------------------------------------
    def memory(self):
        H, D, K = self.H, self.D, self.K
        if self.quick:
            specs = [("core", 1024), ("core", 4096)]
        else:
            specs = [("core", 16384), ("core", 65536), ("core", 262144), ("chunked", 16384)]
        rows = []
        p = self._progress(len(specs), "memory")
        for impl, N in specs:
            spec = {"impl": impl, "B": 1, "N": N, "H": H, "K": K, "D": D, "Dv": D, "causal": True,
                    "threads": self.nthreads}
            r = measure_memory(spec)
            if r.get("peak_bytes") is not None:
                r["ratio_to_io"] = r["peak_bytes"] / r["io_bytes"]
                r["peak_bytes_per_token"] = r["peak_bytes"] / N
            rows.append(r)
            if p is not None:
                p.update(1)
        self._close(p)
        self.results["memory"] = {"rows": rows}

    # -- reporting --------------------------------------------------------------------------------------------
    def targets(self) -> List[dict]:
        """The performance targets of the core, evaluated on what this run measured."""
        out = []
        r = self.results

        def add(name, value, ok, detail=""):
            out.append({"target": name, "value": value, "met": bool(ok), "detail": detail})

        if "speed" in r:
            rows = r["speed"]["rows"]
            big = max(x["N"] for x in rows)
            small = min(x["N"] for x in rows)
            for mode in ("fwd", "fwd+bwd"):
                worst = min(x["chunked_over_core"] for x in rows if x["N"] == big and x["mode"] == mode)
                add(f"core vs chunked at N={big}, {mode}, worse of causal/bidir >= 4x", round(worst, 2), worst >= 4.0)
                c = [x for x in rows if x["N"] == big and x["mode"] == mode and x["causal"]][0]
                add(f"core vs causal SDPA at N={big}, {mode} >= 25x", round(c["sdpa_over_core"], 1),
                    c["sdpa_over_core"] >= 25.0)
                c = [x for x in rows if x["N"] == small and x["mode"] == mode and x["causal"]][0]
                add(f"core vs causal SDPA at N={small}, {mode} >= 1x (no slower)",
                    round(c["sdpa_over_core"], 2), c["sdpa_over_core"] >= 1.0)
            if "matmul" in r or any("matmul_gflops" in x for x in rows):
                for x in rows:
                    if x["N"] == big:
                        x["matmul_ref_gflops"] = matmul_reference_gflops(r, x)
                        x["fraction_of_matmul"] = x["core_gflops"] / x["matmul_ref_gflops"]
                for mode in ("fwd", "fwd+bwd"):
                    for causal in (True, False):
                        x = [y for y in rows if y["N"] == big and y["mode"] == mode and y["causal"] == causal][0]
                        side = "matmul timed in the same rounds" if "matmul_gflops" in x else "matmul section"
                        add(f"achieved GFLOP/s / matmul GFLOP/s, N={big}, {mode}, "
                            f"{'causal' if causal else 'bidir'} >= 40%",
                            round(x["fraction_of_matmul"], 3), x["fraction_of_matmul"] >= 0.40,
                            f"{x['core_gflops']:.1f} of {x['matmul_ref_gflops']:.1f} GFLOP/s, {side}")
        if "scaling" in r:
            for mode in ("fwd", "fwd+bwd"):
                for causal in (True, False):
                    xs = [x for x in r["scaling"]["rows"] if x["mode"] == mode and x["causal"] == causal]
                    per = [x["us_per_token"] for x in xs]
                    spread = max(per) / min(per)
                    add(f"time/token flat N={xs[0]['N']}..{xs[-1]['N']}, {mode}, "
                        f"{'causal' if causal else 'bidir'} (max/min <= 1.2)",
                        round(spread, 3), spread <= 1.2)
        if "threads" in r:
            ref = r.get("threads_matmul")
            note = f"torch.matmul {ref['n']}^3 in the same run: {ref['speedup']:.2f}x" if ref else ""
            for x in r["threads"]["rows"]:
                add(f"1 -> {x['threads']} threads, B*H={x['H']}, N={x['N']}, {x['mode']} >= 1.7x",
                    round(x["speedup"], 2), x["speedup"] >= 1.7, note)
        if "memory" in r:
            mem = [x for x in r["memory"]["rows"] if x["impl"] == "core" and "ratio_to_io" in x]
            target_n = 65536 if not self.quick else max(x["N"] for x in mem) if mem else None
            for x in mem:
                if x["N"] == target_n:
                    add(f"peak memory fwd+bwd causal N={x['N']} / (inputs+outputs+grads) <= 1.5",
                        round(x["ratio_to_io"], 3), x["ratio_to_io"] <= 1.5)
            if len(mem) >= 2:
                per = [x["peak_bytes_per_token"] for x in mem]
                add("peak memory linear in N (bytes/token max/min <= 1.2)", round(max(per) / min(per), 3),
                    max(per) / min(per) <= 1.2)
        if "shapes" in r:
            lin = r["shapes"]["linearity"]
            for mode in ("fwd", "fwd+bwd"):
                xs = [x for x in lin if x["mode"] == mode]
                if len(xs) == 2:
                    ratio = xs[1]["us_per_token"] / xs[0]["us_per_token"]
                    add(f"K={xs[0]['K']} linear: time/token N={xs[1]['N']} vs N={xs[0]['N']}, {mode} (<= 1.2)",
                        round(ratio, 3), ratio <= 1.2)
        return out

    def tables(self) -> str:
        """Every measured table as Markdown (readable as text; results.md is pasted into the docs)."""
        r = self.results
        m = r["machine"]
        lines = []

        def table(header, rows):
            lines.extend(["", "| " + " | ".join(header) + " |",
                          "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"])
            lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)

        def kind(x):
            return "causal" if x["causal"] else "bidir"

        lines.append(f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, flags {','.join(m['cpu_flags'])}; "
                     f"torch {m['torch']} with {m['torch_threads']} threads; core ISA {m['core_isa']}; "
                     f"load average at start {tuple(round(x, 2) for x in m['loadavg_start'])}.")
        if "short" in r:
            lines += short_tables(r["short"])
        if "matmul" in r:
            mm = r["matmul"]
            lines.append(f"float32 torch.matmul {mm['n']}x{mm['n']}: {mm['gflops']:.1f} GFLOP/s "
                         f"(median {mm['seconds']*1e3:.1f} ms).")
        if "speed" in r:
            i2 = r["speed"]
            lines += ["", f"**Core against the references** (B=1, H={i2['H']}, D=Dv={i2['D']}, K={i2['K']}, float32; "
                          "medians in ms; ratio = time of the other / time of the core)"]
            table(["N", "mode", "", "core", "chunked", "SDPA", "chunked/core", "SDPA/core", "core GFLOP/s"],
                  [[x["N"], x["mode"], kind(x), f"{x['core_s']*1e3:.1f}", f"{x['chunked_s']*1e3:.1f}",
                    f"{x['sdpa_s']*1e3:.1f}", f"{x['chunked_over_core']:.2f}", f"{x['sdpa_over_core']:.1f}",
                    f"{x['core_gflops']:.0f}"] for x in i2["rows"]])
            same = [x for x in i2["rows"] if "matmul_gflops" in x]
            if same:
                lines += ["", f"The {same[0]['matmul_n']}^3 matmul timed in the same rounds as the N={same[0]['N']} cells: "
                          + ", ".join(f"{x['mode']} {kind(x)} {x['matmul_gflops']:.0f}" for x in same)
                          + " GFLOP/s (the core's fraction of it is the fraction target below)."]
        if "scaling" in r:
            sc = r["scaling"]
            lines += ["", f"**Scaling in N** (core only, B=1, H={sc['H']}, D=Dv={sc['D']}, K={sc['K']})"]
            table(["N", "mode", "", "ms", "us/token", "GFLOP/s"],
                  [[x["N"], x["mode"], kind(x), f"{x['core_s']*1e3:.1f}", f"{x['us_per_token']:.2f}",
                    f"{x['core_gflops']:.0f}"] for x in sc["rows"]])
        if "shapes" in r:
            sh = r["shapes"]
            mm = r.get("matmul", {}).get("gflops")
            lines += ["", f"**K x D** (causal, B=1, H={sh['H']}, N={sh['rows'][0]['N']}; medians in ms)"]
            table(["K", "D=Dv", "mode", "core", "chunked", "chunked/core", "core GFLOP/s"]
                  + (["of matmul"] if mm else []),
                  [[x["K"], x["D"], x["mode"], f"{x['core_s']*1e3:.1f}", f"{x['chunked_s']*1e3:.1f}",
                    f"{x['chunked_over_core']:.2f}", f"{x['core_gflops']:.0f}"]
                   + ([f"{x['core_gflops']/mm:.0%}"] if mm else []) for x in sh["rows"]])
            lines.append("")
            lines.extend(f"- linear time at K={x['K']}, D={x['D']}: N={x['N']} {x['mode']} {x['core_s']*1e3:.1f} ms, "
                         f"{x['us_per_token']:.2f} us/token" for x in sh["linearity"])
        if "threads" in r:
            lines += ["", "**Threads** (causal; 1 thread and all threads, every cell and the matmul below in one round-robin)"]
            table(["B*H", "N", "mode", "1 thread ms", "threads", "ms", "speed-up"],
                  [[x["H"], x["N"], x["mode"], f"{x['t1_s']*1e3:.1f}", x["threads"],
                    f"{x['t%d_s' % x['threads']]*1e3:.1f}", f"{x['speedup']:.2f}"] for x in r["threads"]["rows"]])
            ref = r.get("threads_matmul")
            if ref:
                lines += ["", f"For reference, a float32 torch.matmul {ref['n']} x {ref['n']} in the same run: "
                          f"{ref['t1_s']*1e3:.1f} ms on 1 thread, {ref['t%d_s' % ref['threads']]*1e3:.1f} ms on "
                          f"{ref['threads']}: {ref['speedup']:.2f}x (the machine's own scaling on dense arithmetic)."]
        if "memory" in r:
            lines += ["", "**Peak memory of forward+backward** (causal, fresh subprocess)"]
            table(["impl", "N", "peak MiB", "inputs+outputs+grads MiB", "ratio", "KiB/token"],
                  [[x["impl"], x["N"], "-", "-", x.get("error", "unavailable"), "-"]
                   if "error" in x or x.get("peak_bytes") is None else
                   [x["impl"], x["N"], f"{x['peak_bytes']/2**20:.0f}", f"{x['io_bytes']/2**20:.0f}",
                    f"{x['ratio_to_io']:.3f}", f"{x['peak_bytes_per_token']/1024:.1f}"] for x in r["memory"]["rows"]])
        if "targets" in r:
            lines += ["", "**Targets, as measured in this run**", ""]
            lines.extend(f"- [{'met' if t['met'] else 'MISSED'}] {t['target']}: **{t['value']}**"
                         + (f" ({t['detail']})" if t["detail"] else "") for t in r["targets"])
        return "\n".join(lines) + "\n"

    def plots(self):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover
            print("matplotlib not installed: no plots")
            return
        r = self.results
        os.makedirs(self.out, exist_ok=True)
        if "speed" in r or "scaling" in r:
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
            for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
                for causal, ls in ((True, "-"), (False, "--")):
                    tag = "causal" if causal else "bidir"
                    if "speed" in r:
                        xs = [x for x in r["speed"]["rows"] if x["mode"] == mode and x["causal"] == causal]
                        for impl, color in (("chunked", "tab:orange"), ("sdpa", "tab:red")):
                            ax.plot([x["N"] for x in xs], [x[f"{impl}_s"] for x in xs], ls, marker="o", color=color,
                                    label=f"{'reference chunked' if impl == 'chunked' else 'SDPA'} {tag}")
                    for src, color, marker, what in (("speed", "tab:blue", "s", "side by side"),
                                                     ("scaling", "tab:cyan", "x", "scaling run")):
                        xs = [x for x in r.get(src, {}).get("rows", []) if x["mode"] == mode and x["causal"] == causal]
                        if xs:
                            ax.plot([x["N"] for x in xs], [x["core_s"] for x in xs], ls, marker=marker, color=color,
                                    label=f"gmattn core {tag} ({what})")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (tokens)")
                ax.set_ylabel("seconds (median)")
                ax.set_title(f"{mode}, B=1 H={self.H} D=Dv={self.D} K={self.K}, float32")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
            m = r["machine"]
            fig.suptitle(f"{m['cpu']} ({m['torch_threads']} threads)", fontsize=9)
            fig.tight_layout()
            fig.savefig(os.path.join(self.out, "time_vs_n.png"), dpi=120)
            plt.close(fig)
        if "matmul" in r and ("speed" in r or "shapes" in r):
            mm = r["matmul"]["gflops"]
            labels, vals = [], []
            if "speed" in r:
                big = max(x["N"] for x in r["speed"]["rows"])
                for x in r["speed"]["rows"]:
                    if x["N"] == big:
                        labels.append(f"N={big} {x['mode']} {'causal' if x['causal'] else 'bidir'}")
                        vals.append(x["core_gflops"] / matmul_reference_gflops(r, x))
            if "shapes" in r:
                for x in r["shapes"]["rows"]:
                    labels.append(f"K={x['K']} D={x['D']} N={x['N']} {x['mode']}")
                    vals.append(x["core_gflops"] / mm)
            fig, ax = plt.subplots(figsize=(10, 0.28 * len(vals) + 1.5))
            ax.barh(range(len(vals)), vals, color="tab:blue")
            ax.axvline(0.4, color="tab:red", ls="--", label="40% target")
            ax.set_yticks(range(len(vals)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(f"core GFLOP/s / float32 matmul GFLOP/s ({r['matmul']['n']}^2: {mm:.0f} GFLOP/s in its "
                          f"section; the N={big if 'speed' in r else '-'} bars use the matmul timed in "
                          f"their own rounds)", fontsize=8)
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(self.out, "matmul_fraction.png"), dpi=120)
            plt.close(fig)
        if "memory" in r:
            mem = [x for x in r["memory"]["rows"] if x["impl"] == "core" and x.get("peak_bytes")]
            if mem:
                fig, ax = plt.subplots(figsize=(6, 4.5))
                ax.plot([x["N"] for x in mem], [x["peak_bytes"] / 2**20 for x in mem], "s-", label="core peak (fwd+bwd)")
                ax.plot([x["N"] for x in mem], [x["io_bytes"] / 2**20 for x in mem], "o--",
                        label="inputs + outputs + gradients")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N")
                ax.set_ylabel("MiB")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend()
                fig.tight_layout()
                fig.savefig(os.path.join(self.out, "memory_vs_n.png"), dpi=120)
                plt.close(fig)


SHORT_TARGETS = {  # the short-sequence targets: name -> limit
    "N=1 forward, us": 40.0,
    "N=1 forward+backward, us": 150.0,
    "N=256 forward, GMA / SDPA": 1.0,
    "N=256 forward+backward, GMA / SDPA": 1.0,
    "byte-LM training step, GMA / softmax": 1.0,
    "one-token step, torch front end / plain PyTorch": 0.2,
    "one-token step, NumPy front end, us": 30.0,
}


def short_tables(sh: dict) -> List[str]:
    """The short-sequence section as Markdown lines: the tables and each target, PASS or MISS."""
    lines = ["", f"**Short sequences** (causal, B=1, H={sh['H']}, D=Dv={sh['D']}, K={sh['K']}, float32, "
                 f"{sh['threads']} threads; medians in us; GMA = gmattn.gma_attention on torch tensors)"]
    lines += ["", "| N | mode | GMA | SDPA | GMA / SDPA |", "|---|---|---:|---:|---:|"]
    lines += [f"| {x['N']} | {x['mode']} | {x['core_s']*1e6:.0f} | {x['sdpa_s']*1e6:.0f} | {x['core_over_sdpa']:.2f} |"
              for x in sh["rows"]]
    fc = sh["fixed_cost"]
    lines += ["", "Fixed cost of an N = 1 call, every piece in one round-robin (us):", "",
              "| piece | us |", "|---|---:|"]
    lines += [f"| {name} | {t*1e6:.1f} |" for name, t in fc.items()]
    floor = fc.get("torch autograd alone, forward+backward (no kernel)")
    if floor is not None:
        lines += ["", f"(torch's autograd alone costs {floor*1e6:.0f} us for a call with these six inputs on this "
                      f"machine now: the floor of any torch op's N = 1 forward+backward, SDPA's included.)"]
    lm = sh["byte_lm"]
    lines += ["", f"Byte-LM training step (d_model {lm['d_model']}, {lm['num_layers']} layers, {lm['num_heads']} heads, "
                  f"K = {lm['num_components']}, B = {lm['B']}, N = {lm['N']}, AdamW): GMA {lm['gma_s']*1e3:.1f} ms, "
                  f"softmax {lm['softmax_s']*1e3:.1f} ms, GMA / softmax {lm['gma_s'] / lm['softmax_s']:.2f}."]
    st = sh["step"]
    plain = st["us"]["plain PyTorch step"]
    lines += ["", "One-token decoding step (B=1, H=8, K=64, D=Dv=64, float32, 1 thread, carried state):", "",
              "| call | us | / plain PyTorch step |", "|---|---:|---:|"]
    lines += [f"| {name} | {us:.1f} | {us / plain:.3f} |" for name, us in st["us"].items()]
    lines.append(f"| arithmetic bound ({st['flops'] / 1e6:.2f} MFLOP at the matmul's {st['matmul_gflops']:.0f} GFLOP/s) "
                 f"| {st['arithmetic_bound_us']:.2f} | {st['arithmetic_bound_us'] / plain:.3f} |")
    by = {(x["N"], x["mode"]): x for x in sh["rows"]}
    measured = {
        "N=1 forward, us": by[1, "fwd"]["core_s"] * 1e6,
        "N=1 forward+backward, us": by[1, "fwd+bwd"]["core_s"] * 1e6,
        "N=256 forward, GMA / SDPA": by.get((256, "fwd"), {}).get("core_over_sdpa"),
        "N=256 forward+backward, GMA / SDPA": by.get((256, "fwd+bwd"), {}).get("core_over_sdpa"),
        "byte-LM training step, GMA / softmax": lm["gma_s"] / lm["softmax_s"],
        "one-token step, torch front end / plain PyTorch": st["us"]["gmattn.gma_attention (torch)"] / plain,
        "one-token step, NumPy front end, us": st["us"]["gmattn.gma_attention (NumPy)"],
    }
    lines += ["", "Targets:", ""]
    for name, limit in SHORT_TARGETS.items():
        value = measured[name]
        if value is None:  # --quick measures no N = 256
            continue
        lines.append(f"- [{'PASS' if value <= limit else 'MISS'}] {name} <= {limit:g}: {value:.3g}"
                     + ("" if value <= limit else f" ({value / limit:.2f}x the limit)"))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds): a smoke test")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu"),
                    help="directory for results.json and the PNG plots")
    ap.add_argument("--report", metavar="RESULTS_JSON", default=None,
                    help="measure nothing: redraw the plots and tables of an earlier run's results.json (next to it)")
    ap.add_argument("--targets", action="store_true",
                    help="developer mode: also evaluate the performance targets the kernels were built to")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0

    if args.report:
        out = os.path.dirname(os.path.abspath(args.report))
        with open(args.report) as f:
            results = json.load(f)
        b = Bench(bool(results.get("quick")), out)
        b.results = results
        if args.targets:
            b.results["targets"] = b.targets()
        b.plots()
        write_tables(b, out)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    b = Bench(args.quick, args.out)
    t0 = time.perf_counter()
    for s in SECTIONS:  # fixed order: matmul before the fractions are computed
        if s in sections:
            getattr(b, s)()
    if args.targets:
        b.results["targets"] = b.targets()
    b.results["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    b.results["wall_seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(b.results, f, indent=1)
    b.plots()
    write_tables(b, args.out)
    print(f"\nwrote results.json, results.md and plots to {args.out} ({b.results['wall_seconds']:.0f} s)")
    return 0


def write_tables(b: "Bench", out: str) -> None:
    text = b.tables()
    print("\n" + text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
