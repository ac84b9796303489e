"""One OpenMP runtime or two: what a process with torch and gmattn loaded gets, and what it costs.

torch's Linux wheels ship libgomp under its own SONAME (torch/lib/libgomp.so.1); the gmattn core
is linked against libgomp.so.1 too. A wheel repaired by auditwheel's default renames its copy
(gmattn.libs/libgomp-<hash>.so...), so torch and gmattn then run two OpenMP runtimes, each
with its own thread pool; the wheel that tools/build_wheels.sh makes by default ships
libgomp.so.1 under its own name, and the dynamic loader maps one copy for both.

Given wheels of both kinds, the script installs each into a directory of its own and runs the
same child process for each, alternating (A B B A ...), in both import orders:

* the OpenMP runtimes mapped (from /proc/self/maps) and the threads of the process after the run;
* the median wall and process CPU time of a training step of a GaussianMixtureAttention layer (projections and the
  output layer run in torch's thread pool, the attention in gmattn's), forward and backward;
* the same for a tight alternation of a small torch op and a small gmattn forward, where
  the workers of one pool still spin-wait while the other pool starts.

    python benchmarks/openmp_runtimes.py --shared DIST/gmattn-...whl --private OTHER/gmattn-...whl
    python benchmarks/openmp_runtimes.py ... --threads 2 --rounds 8 --json out.json

Make the wheels with `tools/build_wheels.sh --openmp shared OUT1` and `--openmp private OUT2`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys, time
order = sys.argv[1]
threads = int(sys.argv[2])
if order == "gmattn-first":
    import gmattn, gmattn._core
    import torch
else:
    import torch
    import gmattn, gmattn._core
from gmattn.torch import GaussianMixtureAttention
sys.path.insert(0, sys.argv[3])
from wheel_smoke import openmp_runtimes

torch.set_num_threads(threads)
torch.manual_seed(0)
layer = GaussianMixtureAttention(128, 4, 32, causal=True)
x = torch.randn(4, 1024, 128, requires_grad=True)
q = torch.randn(1, 256, 2, 16)
v = torch.randn(1, 256, 2, 16)
mu, omega, alpha = torch.randn(2, 8, 16), torch.zeros(2, 8, 16), torch.zeros(2, 8)
a = torch.randn(256, 256)

def train_step():
    layer(x).square().mean().backward()

def alternate():
    for _ in range(20):
        (a @ a).relu_()
        gmattn.gma_attention(q, q, v, mu, omega, alpha, causal=True)

def medians_ms(fn, repeats):
    # (wall, CPU time of the whole process) medians: the spinning idle workers of a second pool
    # show up as CPU time even when other load on the machine blurs the wall time.
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
    return [1e3 * sorted(x)[len(x) // 2] for x in (wall, cpu)]

result = {"runtimes": openmp_runtimes()}
for name, fn in (("train_step", train_step), ("alternate", alternate)):
    result[name + "_ms"], result[name + "_cpu_ms"] = medians_ms(fn, 7)
result["threads"] = len(os.listdir("/proc/self/task"))
print(json.dumps(result))
"""


TIMES = {"train_step_ms": "train wall", "train_step_cpu_ms": "train CPU", "alternate_ms": "alternate wall",
         "alternate_cpu_ms": "alternate CPU"}


def install(wheel: str, target: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", target,
                    wheel], check=True)


def run_child(target: str, order: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=target)
    tools = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")
    out = subprocess.run([sys.executable, "-c", CHILD, order, str(threads), tools], env=env, cwd=target,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", required=True, help="wheel shipping libgomp.so.1 under its own name")
    parser.add_argument("--private", required=True, help="wheel with auditwheel's renamed private libgomp")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all)")
    parser.add_argument("--rounds", type=int, default=6, help="child runs per variant and import order")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    variants = {"shared": args.shared, "private": args.private}
    report = {"threads": args.threads, "rounds": args.rounds, "orders": {}}
    with tempfile.TemporaryDirectory() as tmp:
        targets = {}
        for name, wheel in variants.items():
            targets[name] = os.path.join(tmp, name)
            install(wheel, targets[name])
        for order in ("gmattn-first", "torch-first"):
            runs = {name: [] for name in variants}
            schedule = ["shared", "private", "private", "shared"] * ((args.rounds + 1) // 2)
            for name in schedule[: 2 * args.rounds]:
                runs[name].append(run_child(targets[name], order, args.threads))
            summary = {}
            for name, results in runs.items():
                summary[name] = {
                    "runtimes": sorted({os.path.basename(p) for r in results for p in r["runtimes"]}),
                    "threads": max(r["threads"] for r in results),
                }
                summary[name].update({key: statistics.median(r[key] for r in results) for key in TIMES})
            report["orders"][order] = summary
            print(f"\nimport order: {order}, torch.set_num_threads({args.threads}), {args.rounds} runs each "
                  "(medians of medians)")
            print(f"  {'wheel':8s} {'OpenMP runtimes mapped':44s} {'threads':>7s} "
                  + " ".join(f"{label:>13s}" for label in TIMES.values()))
            for name, s in summary.items():
                print(f"  {name:8s} {' + '.join(s['runtimes']):44s} {s['threads']:7d} "
                      + " ".join(f"{s[key]:11.1f}ms" for key in TIMES))
            print(f"  {'private / shared':60s} "
                  + " ".join(f"{summary['private'][key] / summary['shared'][key]:12.2f}x" for key in TIMES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
