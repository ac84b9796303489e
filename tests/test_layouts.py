"""Every memory layout of the inputs that the binding accepts gives the same results, at about the
speed of the contiguous layout (the layouts are those of benchmarks/layouts.py)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from gmattn import numpy_ops
from gmattn.testing import UNDER_ADDRESS_SANITIZER

_spec = importlib.util.spec_from_file_location(
    "gmattn_bench_layouts", Path(__file__).resolve().parents[1] / "benchmarks" / "layouts.py")
layouts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layouts)

OTHER_LAYOUTS = [name for name in layouts.LAYOUTS if name != "contiguous"]


def _assert_same(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        assert np.array_equal(g, w), f"result {i} differs (max |diff| {np.max(np.abs(g - w))})"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("threads", [1, 3])  # 3 threads, B * H = 4: relays / segments
@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
def test_layouts_give_identical_results(layout, threads, causal, dtype):
    """out and every gradient, bit for bit, whatever the layout of q, k, v and dout (N spans
    several chunks and ends in a partial one)."""
    arrays = layouts.problem(2, 300, 2, 24, 20, 6, dtype=dtype, seed=1)
    q, k, v, dout, mu, omega, alpha = arrays
    want = layouts.gma_call(q, k, v, dout, mu, omega, alpha, causal=causal, backward=True, threads=threads)
    moved = [layouts.LAYOUTS[layout](x) for x in (q, k, v, dout)]
    assert not all(x.flags.c_contiguous for x in moved)
    got = layouts.gma_call(*moved, mu, omega, alpha, causal=causal, backward=True, threads=threads)
    _assert_same(got, want)


@pytest.mark.parametrize("causal", [True, False])
def test_saved_tensors_in_any_layout(causal):
    """The backward reads the saved responsibilities (B, H, N, K) and denominators (B, H, N) in
    any layout: K outermost (Fortran order) and reversed give the same gradients."""
    q, k, v, dout, mu, omega, alpha = layouts.problem(2, 200, 2, 16, 8, 24, dtype=np.float64, seed=2)
    common = dict(causal=causal, eps=1e-6, sigma_eps=1e-4, num_threads=2)
    out, _, _, gq, gk, den = numpy_ops.host_forward(q, k, v, mu, omega, alpha, None, None, None,
                                                    return_state=False, save=True, **common)

    def grads(move):
        saved = [move(x) for x in (gq, gk, den)]
        return numpy_ops.host_backward(q, k, v, mu, omega, alpha, None, None, None, out, *saved, dout, None, None,
                                       **common)[:6]

    want = grads(np.ascontiguousarray)
    _assert_same(grads(np.asfortranarray), want)
    _assert_same(grads(layouts.LAYOUTS["negative"]), want)


@pytest.mark.skipif(UNDER_ADDRESS_SANITIZER, reason="times the kernels, which AddressSanitizer distorts")
@pytest.mark.parametrize("backward", [False, True])
def test_d_outermost_runs_at_contiguous_speed(backward):
    """D as the outermost axis (Fortran order) must not fall off a cliff: reading a row of it once
    walked the whole span between its first and last element (N = 2048, one thread: 10-60x the
    contiguous time). The bound is loose (3x; measured 1.0-1.2x) so that a busy machine does not
    fail it: the layouts' ratios are measured by benchmarks/layouts.py."""
    q, k, v, dout, mu, omega, alpha = layouts.problem(1, 2048, 1, 64, 64, 64, seed=3)
    calls = {}
    for name in ("contiguous", "fortran"):
        arrays = [layouts.LAYOUTS[name](x) for x in (q, k, v, dout)]
        calls[name] = (lambda a=arrays: layouts.gma_call(*a, mu, omega, alpha, causal=True, backward=backward,
                                                        threads=1))
    # Each layout's least CPU time of the calling thread (the kernels run on it with one thread): a
    # stretch descheduled on a busy machine does not count.
    best = {name: min(t) for name, t in layouts.round_robin(calls, 7, time.thread_time).items()}
    ratio = best["fortran"] / best["contiguous"]
    assert ratio < 3.0, f"Fortran-order inputs took {ratio:.1f}x the contiguous time ({best})"


def test_layouts_benchmark_writes_every_ratio(tmp_path):
    out = tmp_path / "layouts.json"
    assert layouts.main(["--n", "130", "--rounds", "1", "--heads", "1", "--dim", "8", "--components", "4",
                         "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["layouts"] == list(layouts.LAYOUTS)
    assert {(c["backward"], c["causal"]) for c in data["cases"]} == {(b, c) for b in (False, True) for c in (False, True)}
    for case in data["cases"]:
        assert case["N"] == 130 and case["contiguous_ms"] > 0
        assert set(case["ratios"]) == set(OTHER_LAYOUTS) and all(r > 0 for r in case["ratios"].values())
    assert data["worst_ratio"] == max(r for c in data["cases"] for r in c["ratios"].values())
