"""Smoke test of an installed gmattn wheel: run it from outside the source tree.

    python tools/wheel_smoke.py [--require numpy,torch,mlx] [--openmp-runtimes N]

Checks that gmattn is imported from site-packages (not a source checkout), then runs a small
causal problem with an initial state through every front end that is installed: NumPy and MLX
outputs are compared with the torch front end, and the torch front end (forward, final state
and every gradient) with the float64 reference `gmattn.reference.naive_gma`. `--require` makes
a missing framework an error instead of a skipped section. On Linux, with torch and gmattn both
loaded, it reports the OpenMP runtimes mapped into the process
(/proc/self/maps); `--openmp-runtimes N` requires exactly N of them. tools/build_wheels.sh
and the cibuildwheel test command run this file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import sysconfig

B, N, H, K, D, DV = 2, 40, 2, 5, 4, 3
FRAMEWORKS = ("numpy", "torch", "mlx")
OPENMP_LIBRARY = re.compile(r"/(lib(?:g|i)?omp[^/]*\.(?:so|dylib)[^/]*)$")


def openmp_runtimes() -> list:
    """Paths of the OpenMP runtime libraries mapped into this process (Linux), one per copy."""
    with open("/proc/self/maps") as maps:
        paths = {fields[-1] for fields in map(str.split, maps) if len(fields) >= 6}
    return sorted(path for path in paths if OPENMP_LIBRARY.search(path))


def problem(np):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((B, N, H, D)), rng.standard_normal((B, N, H, D))
    v = rng.standard_normal((B, N, H, DV))
    mu, omega, alpha = rng.standard_normal((H, K, D)), 0.5 * rng.standard_normal((H, K, D)), rng.standard_normal((H, K))
    S0, z0 = rng.random((B, H, K, DV)), rng.random((B, H, K)) + 0.1
    return [x.astype(np.float32) for x in (q, k, v, mu, omega, alpha, S0, z0)]


def run_numpy(gmattn, arrays):
    q, k, v, mu, omega, alpha, S0, z0 = arrays
    out, (S, z) = gmattn.gma_attention(q, k, v, mu, omega, alpha, causal=True, initial_state=(S0, z0),
                                       output_final_state=True)
    return out, S, z


def run_torch(gmattn, arrays):
    """Forward and backward through the torch front end against the float64 reference; returns
    (out, S, z) as NumPy arrays."""
    import torch
    from gmattn import reference

    ours = [torch.from_numpy(a).requires_grad_() for a in arrays]
    exact = [torch.from_numpy(a).double().requires_grad_() for a in arrays]
    results = []
    for inputs, attention in ((ours, gmattn.gma_attention), (exact, reference.naive_gma)):
        out, (S, z) = attention(*inputs[:6], causal=True, initial_state=tuple(inputs[6:]), output_final_state=True)
        loss = out.square().sum() + S.sum() + z.sum()
        results.append([out, S, z] + list(torch.autograd.grad(loss, inputs)))
    names = ["out", "S", "z", "dq", "dk", "dv", "dmu", "domega", "dalpha", "dS0", "dz0"]
    for name, got, want in zip(names, *results):
        err = (got.double() - want).abs().max().item()
        scale = want.abs().max().item()
        if not err <= 1e-4 * max(scale, 1.0):
            raise SystemExit(f"torch: {name} differs from the float64 reference by {err:.3g} (scale {scale:.3g})")
    return [t.detach().numpy() for t in results[0][:3]]


def run_mlx(gmattn, arrays):
    import mlx.core as mx
    import numpy as np

    out, (S, z) = gmattn.gma_attention(*[mx.array(a) for a in arrays[:6]], causal=True,
                                       initial_state=(mx.array(arrays[6]), mx.array(arrays[7])),
                                       output_final_state=True)
    return [np.array(t) for t in (out, S, z)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--require", default="numpy", help="comma-separated frameworks that must be present "
                        f"(of {', '.join(FRAMEWORKS)}; default numpy)")
    parser.add_argument("--openmp-runtimes", type=int, default=None,
                        help="Linux: the number of OpenMP runtimes that must be mapped with torch and gmattn loaded")
    args = parser.parse_args(argv)
    required = {name for name in args.require.split(",") if name}
    unknown = required - set(FRAMEWORKS)
    if unknown:
        parser.error(f"--require: unknown framework(s) {sorted(unknown)}; choose from {FRAMEWORKS}")

    import numpy as np

    import gmattn
    from gmattn import _ext

    location = os.path.realpath(gmattn.__file__)
    site = {os.path.realpath(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    if not any(location.startswith(path + os.sep) for path in site):
        raise SystemExit(f"gmattn was imported from {location}, not from this Python's site-packages {sorted(site)}")
    print(f"gmattn {gmattn.__version__} from {os.path.dirname(location)}")
    print(f"  compiled core: {os.path.basename(_ext.core().__file__)}")

    arrays = problem(np)
    results = {"numpy": run_numpy(gmattn, arrays)}
    print("  numpy: causal forward with state ran")
    for name, run in (("torch", run_torch), ("mlx", run_mlx)):
        if importlib.util.find_spec(name) is None:
            if name in required:
                raise SystemExit(f"{name} is required (--require) but not installed")
            print(f"  {name}: not installed, skipped")
            continue
        results[name] = run(gmattn, arrays)
        print(f"  {name}: ran" + (" forward and backward; matches the float64 reference" if name == "torch" else ""))
    reference_name = "torch" if "torch" in results else "numpy"
    for name, result in results.items():
        for label, got, want in zip(("out", "S", "z"), result, results[reference_name]):
            if not np.allclose(got, want, rtol=1e-5, atol=1e-5):
                raise SystemExit(f"{name}: {label} differs from the {reference_name} front end")
    print(f"  front ends agree: {', '.join(results)}")

    if sys.platform.startswith("linux") and "torch" in results:
        runtimes = openmp_runtimes()
        print(f"  OpenMP runtimes mapped ({len(runtimes)}): {', '.join(runtimes) or 'none'}")
        if args.openmp_runtimes is not None and len(runtimes) != args.openmp_runtimes:
            raise SystemExit(f"expected {args.openmp_runtimes} OpenMP runtime(s) mapped, found {len(runtimes)}")
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
