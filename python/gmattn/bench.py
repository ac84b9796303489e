"""gmattn-bench: speed and peak memory of every mixer kind against sequence length N.

    gmattn-bench                                   # every kind, every installed framework
    python -m gmattn.bench --kinds gma,softmax --frameworks torch --n 512,1024,2048,4096
    gmattn-bench --quick --out /tmp/bench          # a tiny run (tests, smoke checks)
    gmattn-bench --frameworks mlx,mlx-compiled     # MLX eager beside MLX under mx.compile

For each (framework, kind, N) a fresh subprocess builds one mixer (B, N, d_model) and measures

* forward: inference forward (torch.no_grad / a plain evaluated MLX call), and
* train: forward + backward (gradients of every trainable parameter and of the input),

giving the median wall time and the peak memory.

Timing. A fresh process pays once for what later calls reuse: its first call of a torch custom op
imports torch._dynamo (seconds), thread pools start, and the first calls at a new size fault in
fresh pages. So the worker warms up first (`--warmup` calls and at least `--warmup-time` seconds,
small inputs and then the real ones), then times calls until it has `--repeats` of them and
`--min-time` seconds of them, and reports the median of those calls. `--in-process` runs every
point in this process instead (no fresh subprocess, memory only where the RSS peak can be reset):
the two agree within noise when the warm-up is long enough.

Peak memory is the growth of the process's resident set (RSS) during one call, so buffers of
native code (the compiled core, oneDNN, MLX, BLAS) count, not only Python allocations. On Linux
the high-water mark VmHWM is reset by writing "5" to /proc/self/clear_refs just before the call
and read from /proc/self/status after it; peak = VmHWM - VmRSS(before). Before each reset the
worker runs the garbage collector, empties MLX's buffer cache and calls malloc_trim, and it runs
with MALLOC_MMAP_THRESHOLD_=65536 so large freed blocks go back to the OS instead of lingering
in malloc's free lists (where reuse would hide them); the timed runs come after the memory
runs, with glibc's usual steady-state thresholds set again (mallopt). The weights and the input are allocated
before the baseline, so the figure is what the call itself needs: activations, temporaries,
outputs and (train) gradients. Where clear_refs cannot be written (macOS, some sandboxes) each
measurement gets its own subprocess and peak = ru_maxrss(after) - ru_maxrss(before).

Results go to <out>/results.json, <out>/time_vs_n.png and <out>/memory_vs_n.png, and the N at
which GMA overtakes softmax (forward and training) is printed for each framework.
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
from typing import Any, Dict, List, Optional, Sequence

KIND_ORDER = ("gma", "softmax", "linear", "performer", "ssm")
MODES = ("forward", "train")
DEFAULT_N = (512, 1024, 2048, 4096)
QUICK_N = (64, 128)


# ----------------------------------------------------------------------------------------------
# Memory probes (worker side)
# ----------------------------------------------------------------------------------------------
def proc_status_kib(field: str) -> Optional[int]:
    """A /proc/self/status field in KiB (VmRSS, VmHWM, ...); None where there is none (not Linux).
    Public: benchmarks/cpu.py reads memory through it too."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def can_reset_peak_rss() -> bool:
    """Whether this process can reset its RSS high-water mark (Linux /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return proc_status_kib("VmHWM") is not None


def _ru_maxrss_bytes() -> int:
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


# "mlx-compiled" times the same MLX mixer with its forward and its gradient step under mx.compile,
# as MLX users run their training step; it is a series of its own beside eager "mlx".
COMPILED_FRAMEWORKS = {"mlx-compiled": "mlx"}


def _base_framework(framework: str) -> str:
    return COMPILED_FRAMEWORKS.get(framework, framework)


def _release_memory(framework: str) -> None:
    gc.collect()
    if _base_framework(framework) == "mlx":
        import mlx.core as mx

        mx.clear_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _malloc_for_timing() -> None:
    """Undo the worker's memory-measurement malloc settings (MALLOC_MMAP_THRESHOLD_=65536, which
    unmaps every freed block) before timing: use the thresholds glibc's own dynamic tuning settles
    at (32 MiB mmap threshold, trim at twice that), so timings carry no extra page faults."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak RSS growth (bytes) over a block: `with PeakMemory(fw, reset=True) as p: ...; p.bytes`."""

    def __init__(self, framework: str, reset: bool):
        self.framework, self.reset, self.bytes = framework, reset, None

    def __enter__(self):
        _release_memory(self.framework)
        if self.reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = proc_status_kib("VmRSS") * 1024
        else:
            self.base = _ru_maxrss_bytes()
        return self

    def __exit__(self, *exc):
        peak = proc_status_kib("VmHWM") * 1024 if self.reset else _ru_maxrss_bytes()
        self.bytes = max(0, peak - self.base)
        return False


# ----------------------------------------------------------------------------------------------
# One benchmark point (worker side)
# ----------------------------------------------------------------------------------------------
def _config(spec: Dict[str, Any]):
    from gmattn.mixers import MixerConfig

    return MixerConfig(kind=spec["kind"], d_model=spec["d_model"], num_heads=spec["heads"],
                       causal=spec["causal"], num_components=spec["components"],
                       num_features=spec.get("features"), seed=0)


def _torch_callables(spec):
    import torch

    from gmattn.mixers import build_mixer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    mixer = build_mixer(_config(spec), framework="torch")
    params = [p for p in mixer.parameters() if p.requires_grad]

    def make_input(N):
        return torch.randn(spec["batch"], N, spec["d_model"])

    def forward(x):
        with torch.no_grad():
            y = mixer(x)
        return float(y[0, -1, 0])

    def train(x):
        for p in params:
            p.grad = None
        x = x.detach().requires_grad_(True)
        loss = mixer(x).square().mean()
        loss.backward()
        return float(loss.detach())

    def clear():
        for p in params:
            p.grad = None

    return make_input, forward, train, clear


def _mlx_callables(spec):
    import mlx.core as mx

    from gmattn.mixers import build_mixer

    mx.random.seed(0)
    mixer = build_mixer(_config(spec), framework="mlx")
    mx.eval(mixer.parameters())
    weights = mixer.trainable_parameters()

    def forward_fn(params, x):
        mixer.update(params)
        return mixer(x)

    def loss_fn(params, x):
        mixer.update(params)
        return (mixer(x) ** 2).mean()

    forward_step = forward_fn
    grad_fn = mx.value_and_grad(loss_fn, argnums=(0, 1))
    if spec["framework"] == "mlx-compiled":
        forward_step, grad_fn = mx.compile(forward_fn), mx.compile(grad_fn)

    def make_input(N):
        x = mx.random.normal((spec["batch"], N, spec["d_model"]))
        mx.eval(x)
        return x

    def forward(x):
        y = forward_step(weights, x)
        mixer.update(weights)  # a traced call leaves placeholders in the module: put the weights back
        mx.eval(y)
        return y[0, -1, 0].item()

    def train(x):
        loss, grads = grad_fn(weights, x)
        mixer.update(weights)
        mx.eval(loss, grads)
        return loss.item()

    return make_input, forward, train, lambda: None


def run_point(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Measure one (framework, kind, N) in this process; returns the result record."""
    fw, N = spec["framework"], spec["n"]
    make_input, forward, train, clear = (_torch_callables if fw == "torch" else _mlx_callables)(spec)
    fns = {"forward": forward, "train": train}
    modes = spec["modes"]
    # Small warm-up: thread pools and lazy library state exist before any baseline is taken.
    small = make_input(min(N, 16))
    for mode in modes:
        fns[mode](small)
    clear()
    del small
    x = make_input(N)
    result: Dict[str, Any] = {}
    first_s: Dict[str, float] = {}
    if spec["memory"] != "none":
        reset = spec["memory"] == "reset"
        for mode in spec.get("memory_modes", modes):
            with PeakMemory(fw, reset) as probe:
                t0 = time.perf_counter()
                fns[mode](x)
                first_s[mode] = time.perf_counter() - t0
            clear()
            result[f"{mode}_peak_mib"] = probe.bytes / 2**20
    _malloc_for_timing()
    budget = spec.get("budget_s", 10.0)
    for mode in spec.get("time_modes", modes):
        # A call slower than a second needs no warm-up beyond the memory run it already had.
        if first_s.get(mode, 0.0) <= 1.0:
            _calls_for(fns[mode], x, spec["warmup"], spec.get("warmup_s", 0.0), budget)
        times = _calls_for(fns[mode], x, spec["repeats"], spec.get("min_time_s", 0.0), budget)
        clear()
        result[f"{mode}_ms"] = statistics.median(times)
        result[f"{mode}_ms_min"] = min(times)
        result[f"{mode}_ms_all"] = times
    return result


def _calls_for(fn, x, calls: int, seconds: float, budget_s: float) -> List[float]:
    """Runs fn(x) until it has run `calls` times and for `seconds`, or `budget_s` has passed (a slow
    point: fewer calls); returns each call's wall time in ms."""
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s:
            break
    return times


# ----------------------------------------------------------------------------------------------
# Driver (parent side)
# ----------------------------------------------------------------------------------------------
def _worker_env(threads: Optional[int]) -> Dict[str, str]:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # fixed: big blocks are mmapped and unmapped on free
    env["MALLOC_TRIM_THRESHOLD_"] = "131072"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _spawn(spec: Dict[str, Any], timeout: float, env: Dict[str, str]) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "gmattn.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
        return {"error": f"{reason}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def measure(spec: Dict[str, Any], memory_reset: bool, timeout: float, env) -> Dict[str, Any]:
    """One point: one subprocess (or, without an RSS reset, one per memory measurement)."""
    if memory_reset or spec["memory"] == "none":
        return _spawn({**spec, "memory": "reset" if spec["memory"] != "none" else "none"}, timeout, env)
    out: Dict[str, Any] = {}
    for mode in spec["modes"]:  # ru_maxrss only grows: a fresh process per measurement
        r = _spawn({**spec, "memory": "maxrss", "memory_modes": [mode], "time_modes": []}, timeout, env)
        out.update(r)
        if "error" in r:
            return out
    out.update(_spawn({**spec, "memory": "none"}, timeout, env))
    return out


def _measure_here(spec: Dict[str, Any], memory_reset: bool) -> Dict[str, Any]:
    """One point in this process (--in-process); memory only where the RSS peak can be reset."""
    try:
        return run_point({**spec, "memory": "reset" if memory_reset and spec["memory"] != "none" else "none"})
    except Exception as exc:  # a failing point is recorded like a failed subprocess
        return {"error": f"{type(exc).__name__}: {exc}"}


def crossover(results: Sequence[Dict[str, Any]], framework: str, metric: str,
              a: str = "gma", b: str = "softmax") -> Dict[str, Any]:
    """Smallest N from which `a` beats `b` on `metric` (e.g. "forward_ms") at every larger N measured,
    with a log-log interpolation between the last N where it did not and the first where it does."""
    def series(kind):
        return {r["n"]: r[metric] for r in results
                if r["framework"] == framework and r["kind"] == kind and r.get(metric) is not None}

    sa, sb = series(a), series(b)
    ns = sorted(set(sa) & set(sb))
    if not ns:
        return {"n": None, "status": "no common measurements"}
    ratio = {n: sa[n] / sb[n] for n in ns}
    start = None
    for i in range(len(ns) - 1, -1, -1):
        if ratio[ns[i]] < 1.0:
            start = i
        else:
            break
    ratios = {str(n): ratio[n] for n in ns}
    if start is None:
        return {"n": None, "status": f"{a} is not ahead at N={ns[-1]} (largest measured)", "ratios": ratios}
    if start == 0:
        return {"n": ns[0], "status": f"{a} is ahead at every N measured (from N={ns[0]})", "ratios": ratios,
                "first_ahead": ns[0]}
    n0, n1 = ns[start - 1], ns[start]
    r0, r1 = math.log(ratio[n0]), math.log(ratio[n1])
    t = r0 / (r0 - r1) if r0 != r1 else 1.0
    n_star = math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    return {"n": n_star, "status": f"{a} ahead from N~{n_star:.0f} (first measured N={n1})", "ratios": ratios,
            "first_ahead": n1}


def _label(mode: str) -> str:
    return "forward" if mode == "forward" else "forward + backward"


def plot(results: Sequence[Dict[str, Any]], out_dir: str, title: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"gma": "tab:red", "softmax": "tab:blue", "linear": "tab:green", "performer": "tab:purple",
              "ssm": "tab:orange"}
    styles = {"torch": "-", "mlx": "--", "mlx-compiled": "-."}
    markers = {"torch": "o", "mlx": "s", "mlx-compiled": "^"}
    paths = []
    for metric, ylabel, name in (("ms", "time per call (ms)", "time_vs_n.png"),
                                 ("peak_mib", "peak memory (MiB, RSS growth)", "memory_vs_n.png")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        legend: Dict[str, Any] = {}  # one legend for both panels, below them: it never covers a curve
        for ax, mode in zip(axes, MODES):
            key = f"{mode}_{metric}"
            for fw in sorted({r["framework"] for r in results}):
                for kind in KIND_ORDER:
                    pts = sorted((r["n"], r[key]) for r in results
                                 if r["framework"] == fw and r["kind"] == kind and r.get(key) is not None)
                    pts = [(n, max(v, 1e-3)) for n, v in pts]
                    if not pts:
                        continue
                    (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(fw, ":"),
                                      marker=markers.get(fw, "x"), color=colors.get(kind))
                    legend.setdefault(f"{kind} ({fw})", line)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.set_title(_label(mode))
            ax.grid(True, which="both", alpha=0.3)
        if legend:
            fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 4),
                       frameon=False)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0.12 if len(legend) > 4 else 0.07, 1, 1))
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _versions(frameworks) -> Dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("gmattn", "numpy", *sorted({_base_framework(fw) for fw in frameworks})):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _csv(text: str, cast=str) -> List:
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gmattn-bench",
        description="Speed (forward, forward+backward) and peak memory of sequence mixers against N.",
        epilog="Peak memory: RSS high-water mark growth over one call, measured in a fresh subprocess per "
               "point (see the module docstring of gmattn.bench).",
    )
    p.add_argument("--kinds", default=",".join(KIND_ORDER), help="comma-separated mixer kinds (default: all)")
    p.add_argument("--frameworks", default=None,
                   help="comma-separated frameworks: torch, mlx, and mlx-compiled (MLX's forward and gradient "
                        "step under mx.compile) (default: torch and mlx where installed)")
    p.add_argument("--n", default=None, help=f"comma-separated sequence lengths (default: {','.join(map(str, DEFAULT_N))})")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    p.add_argument("--d-model", type=int, default=None, help="model width (default 256)")
    p.add_argument("--heads", type=int, default=None, help="heads (default 4)")
    p.add_argument("--components", "-K", type=int, default=None, help="GMA components K per head (default 32)")
    p.add_argument("--features", type=int, default=None, help="performer random features M (default 2*head_dim)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal mixers (default) or --no-causal for bidirectional")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per point at least; the median is reported (default 5)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed calls per point and mode at least (default 0.5; --quick 0.2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 2)")
    p.add_argument("--warmup-time", type=float, default=None,
                   help="seconds of untimed calls before timing at least (default 0.5; --quick 0.3)")
    p.add_argument("--in-process", action="store_true",
                   help="run every point in this process instead of a fresh subprocess each (to compare)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--modes", default="forward,train", help="forward, train or both (default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per point before it is abandoned")
    p.add_argument("--max-call-seconds", type=float, default=2.0,
                   help="a series stops after the first N whose slowest call takes longer (default 2)")
    p.add_argument("--budget", type=float, default=5.0,
                   help="seconds of timed runs per point and mode before repeats are cut short (default 5)")
    p.add_argument("--out", default="bench_results", help="output directory (default ./bench_results)")
    p.add_argument("--no-plots", action="store_true", help="write JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for smoke tests: N=64,128, d_model=64, 2 heads, K=8, shorter timing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(batch=1, d_model=64 if quick else 256, heads=2 if quick else 4, components=8 if quick else 32,
                    repeats=5, warmup=2, min_time=0.2 if quick else 0.5, warmup_time=0.3 if quick else 0.5)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.n = _csv(args.n, int) if args.n else list(QUICK_N if quick else DEFAULT_N)
    args.kinds = _csv(args.kinds)
    args.modes = _csv(args.modes)
    bad = [k for k in args.kinds if k not in KIND_ORDER] + [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown kinds/modes {bad}; kinds are {KIND_ORDER}, modes {MODES}")
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_point(json.loads(args.worker))), flush=True)
        return 0

    from gmattn.mixers import available_frameworks, available_kinds

    installed = available_frameworks()
    frameworks = _csv(args.frameworks) if args.frameworks else list(installed)
    notes = []
    unknown = [fw for fw in frameworks if _base_framework(fw) not in ("torch", "mlx")]
    if unknown:
        print(f"gmattn-bench: unknown frameworks {unknown}; choose from torch, mlx, mlx-compiled", file=sys.stderr)
        return 2
    for fw in list(frameworks):
        if _base_framework(fw) not in installed:
            notes.append(f"framework {_base_framework(fw)} is not installed: {fw} skipped")
            frameworks.remove(fw)
    plan = []
    for fw in frameworks:
        kinds_here = available_kinds(_base_framework(fw))
        for kind in args.kinds:
            if kind not in kinds_here:
                notes.append(f"{kind} is not available for {fw}: skipped")
                continue
            plan.append((fw, kind))
    for note in notes:
        print("gmattn-bench:", note, file=sys.stderr)
    if not plan:
        print("gmattn-bench: nothing to run", file=sys.stderr)
        return 1

    os.makedirs(args.out, exist_ok=True)
    memory_reset = can_reset_peak_rss()
    memory_method = (
        "none" if args.no_memory else
        "VmHWM - VmRSS after resetting the high-water mark via /proc/self/clear_refs, fresh subprocess per point"
        if memory_reset else "ru_maxrss(after) - ru_maxrss(before), fresh subprocess per measurement")
    env = _worker_env(args.threads)
    threads = args.threads or os.cpu_count()
    base = dict(batch=args.batch, d_model=args.d_model, heads=args.heads, components=args.components,
                features=args.features, causal=args.causal, repeats=args.repeats, warmup=args.warmup,
                warmup_s=args.warmup_time, min_time_s=args.min_time, threads=args.threads, modes=args.modes,
                memory="none" if args.no_memory else "yes", budget_s=args.budget)
    try:
        from tqdm import tqdm
    except ImportError:  # progress is optional
        tqdm = None
    load_before = _loadavg()
    total = len(plan) * len(args.n)
    bar = tqdm(total=total, unit="pt", disable=args.no_progress, file=sys.stderr) if tqdm else None
    results: List[Dict[str, Any]] = []
    for fw, kind in plan:
        failed = None
        for n in sorted(args.n):
            record = {"framework": fw, "kind": kind, "n": n}
            if bar is not None:
                bar.set_description(f"{fw:5s} {kind:9s} N={n}")
            if failed:
                record["error"] = f"skipped: {failed}"
            else:
                spec = {**base, "framework": fw, "kind": kind, "n": n}
                record.update(_measure_here(spec, memory_reset) if args.in_process else
                              measure(spec, memory_reset, args.timeout, env))
                slowest = max((record.get(f"{m}_ms") or 0.0) for m in args.modes) / 1e3
                if "error" in record:
                    failed = record["error"]
                elif slowest > args.max_call_seconds:
                    failed = f"N={n} took {slowest:.1f} s per call (> --max-call-seconds {args.max_call_seconds:g})"
            results.append(record)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    crossovers = {}
    for fw in frameworks:
        for mode in args.modes:
            crossovers[f"{fw}/{mode}_ms"] = crossover(results, fw, f"{mode}_ms")
            if not args.no_memory:
                crossovers[f"{fw}/{mode}_peak_mib"] = crossover(results, fw, f"{mode}_peak_mib")
    shape = (f"B={args.batch}, d_model={args.d_model}, H={args.heads}, head_dim={args.d_model // args.heads}, "
             f"K={args.components}, {'causal' if args.causal else 'bidirectional'}, float32, {threads} threads")
    meta = {
        "shape": shape,
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "memory_method": memory_method,
        "timing": (f"median of at least {args.repeats} calls and {args.min_time:g} s of calls, after at least "
                   f"{args.warmup} warm-up calls and {args.warmup_time:g} s, wall clock, "
                   + ("all points in one process" if args.in_process else "a fresh subprocess per point")),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": _versions(frameworks),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        # Other work on the machine skews timings: the 1-minute load average before and after.
        "load_average": {"before": load_before, "after": _loadavg()},
        "notes": notes,
    }
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results, "crossover": crossovers}, f, indent=1)
    plots = [] if args.no_plots else plot(results, args.out, f"gmattn-bench: {shape}")

    _print_summary(results, frameworks, args, crossovers, shape)
    print(f"\nresults: {path}" + "".join(f"\nplot:    {p}" for p in plots))
    return 0


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _crossover_text(c: Dict[str, Any]) -> str:
    n = c.get("n")
    if n is None:
        return c.get("status", "")
    if "every N" in c.get("status", ""):
        return f"N <= {n:.0f}   ({c['status']})"
    return f"N ~ {n:.0f}   ({c['status']})"


def _cell(record: Dict[str, Any], key: str) -> str:
    if "error" in record:
        return "skip" if record["error"].startswith("skipped") else "fail"
    return _fmt(record.get(key))


def _print_summary(results, frameworks, args, crossovers, shape) -> None:
    print(f"\ngmattn-bench  ({shape})")
    load = _loadavg()
    if load is not None and load > (os.cpu_count() or 1) * 0.75:
        print(f"warning: load average {load} on {os.cpu_count()} CPUs: other work skews these timings "
              "(multi-threaded kernels suffer most; --threads 1 is steadier on a busy machine)")
    kinds = [k for k in KIND_ORDER if k in args.kinds]
    for fw in frameworks:
        for mode in args.modes:
            for metric, unit in (("ms", "ms"), ("peak_mib", "MiB")):
                if metric == "peak_mib" and args.no_memory:
                    continue
                key = f"{mode}_{metric}"
                print(f"\n[{fw}] {_label(mode)}: {'time' if metric == 'ms' else 'peak memory'} ({unit})")
                print("  " + f"{'N':>7s}" + "".join(f"{k:>11s}" for k in kinds))
                for n in sorted(args.n):
                    row = {r["kind"]: r for r in results if r["framework"] == fw and r["n"] == n}
                    cells = [_cell(row.get(k, {}), key) for k in kinds]
                    print("  " + f"{n:>7d}" + "".join(f"{c:>11s}" for c in cells))
    seen = set()
    for r in results:
        if "error" in r and (r["framework"], r["kind"]) not in seen:
            seen.add((r["framework"], r["kind"]))
            print(f"\n{r['framework']}/{r['kind']} from N={r['n']}: {r['error']}")
    if "gma" in args.kinds and "softmax" in args.kinds:
        print("\nCrossover: N at which GMA overtakes softmax")
        for fw in frameworks:
            for mode in args.modes:
                c = crossovers.get(f"{fw}/{mode}_ms", {})
                n = c.get("n")
                print(f"  [{fw}] {_label(mode):19s} time:   " + _crossover_text(c))
                c = crossovers.get(f"{fw}/{mode}_peak_mib")
                if c:
                    print(f"  [{fw}] {_label(mode):19s} memory: " + _crossover_text(c))


if __name__ == "__main__":
    sys.exit(main())
