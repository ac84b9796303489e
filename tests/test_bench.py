"""gmattn-bench: the memory probe, the crossover logic, one in-process point, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from gmattn import bench

HAS_MLX = importlib.util.find_spec("mlx") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.skipif(not bench.can_reset_peak_rss(), reason="needs /proc/self/clear_refs (Linux)")
def test_peak_memory_sees_native_buffers_freed_before_the_end():
    """A 64 MiB NumPy buffer (native memory, invisible to tracemalloc) allocated and freed inside
    the block still shows as the peak; an empty block shows (almost) nothing."""
    with bench.PeakMemory("numpy", reset=True) as probe:
        a = np.ones(64 * 2**20 // 8)  # touched pages, 64 MiB
        del a
    assert 60 <= probe.bytes / 2**20 <= 72
    with bench.PeakMemory("numpy", reset=True) as idle:
        pass
    assert idle.bytes / 2**20 < 4


def _rec(fw, kind, n, ms):
    return {"framework": fw, "kind": kind, "n": n, "forward_ms": ms}


def test_crossover_interpolates_in_log_log():
    res = [_rec("torch", "softmax", n, n * n / 1000) for n in (256, 512, 1024, 2048)]
    res += [_rec("torch", "gma", n, float(n)) for n in (256, 512, 1024, 2048)]  # equal at N = 1000
    c = bench.crossover(res, "torch", "forward_ms")
    assert c["first_ahead"] == 1024 and math.isclose(c["n"], 1000.0, rel_tol=1e-9)
    # Ahead everywhere, never ahead, ahead then behind again (only a lasting lead counts).
    always = bench.crossover([_rec("t", "softmax", 8, 2.0), _rec("t", "gma", 8, 1.0)], "t", "forward_ms")
    assert always["n"] == 8 and "every N" in always["status"]
    never = bench.crossover([_rec("t", "softmax", 8, 1.0), _rec("t", "gma", 8, 2.0)], "t", "forward_ms")
    assert never["n"] is None
    flip = [_rec("t", "softmax", n, s) for n, s in ((8, 1.0), (16, 3.0), (32, 1.0))]
    flip += [_rec("t", "gma", n, 2.0) for n in (8, 16, 32)]
    assert bench.crossover(flip, "t", "forward_ms")["n"] is None
    assert bench.crossover([], "t", "forward_ms")["n"] is None


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_run_point_in_process_measures_time_and_memory():
    spec = dict(framework="torch", kind="linear", n=32, batch=1, d_model=16, heads=2, components=4, features=None,
                causal=True, repeats=2, warmup=0, threads=None, modes=["forward", "train"],
                memory="reset" if bench.can_reset_peak_rss() else "none")
    out = bench.run_point(spec)
    for mode in ("forward", "train"):
        assert out[f"{mode}_ms"] > 0 and len(out[f"{mode}_ms_all"]) == 2
        if spec["memory"] == "reset":
            assert out[f"{mode}_peak_mib"] >= 0


def test_parse_args_defaults_and_quick():
    a = bench.parse_args([])
    assert a.n == list(bench.DEFAULT_N) and a.d_model == 256 and a.causal and a.kinds == list(bench.KIND_ORDER)
    q = bench.parse_args(["--quick", "--no-causal", "--kinds", "gma,linear", "--n", "16,32", "-K", "4"])
    assert q.n == [16, 32] and q.d_model == 64 and q.repeats == 5 and not q.causal and q.components == 4
    assert q.min_time == 0.2 and q.warmup_time == 0.3 and a.min_time == 0.5 and a.warmup == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--kinds", "mamba"])


@pytest.mark.skipif(not (HAS_MLX or HAS_TORCH), reason="needs torch or MLX")
def test_quick_end_to_end(tmp_path, capsys):
    fw = "mlx" if HAS_MLX else "torch"  # MLX workers start in about a second
    rc = bench.main(["--quick", "--frameworks", fw, "--kinds", "gma,softmax", "--n", "32,64",
                     "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["results"]) == 4
    for r in data["results"]:
        assert "error" not in r, r
        assert r["forward_ms"] > 0 and r["train_ms"] > 0
        assert r["forward_peak_mib"] >= 0 and r["train_peak_mib"] >= 0
    assert f"{fw}/forward_ms" in data["crossover"] and f"{fw}/train_ms" in data["crossover"]
    assert "clear_refs" in data["meta"]["memory_method"] or "ru_maxrss" in data["meta"]["memory_method"]
    for name in ("time_vs_n.png", "memory_vs_n.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Crossover: N at which GMA overtakes softmax" in out and "[%s] forward" % fw in out


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_worker_subprocess_and_failure_skips_larger_n(tmp_path):
    rc = bench.main(["--quick", "--frameworks", "torch", "--kinds", "linear", "--n", "32,64", "--modes", "train",
                     "--max-call-seconds", "0", "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert rc == 0
    r, r2 = json.loads((tmp_path / "results.json").read_text())["results"]
    assert r["train_ms"] > 0 and r["train_peak_mib"] >= 0 and "forward_ms" not in r
    # Slower than --max-call-seconds: the larger N of the series are skipped.
    assert r2["n"] == 64 and r2["error"].startswith("skipped: N=32 took")
    # A point that cannot finish is abandoned and the larger N of its series are skipped.
    rc = bench.main(["--quick", "--frameworks", "torch", "--kinds", "softmax", "--n", "32,64", "--timeout", "0.01",
                     "--out", str(tmp_path), "--no-progress", "--no-plots"])
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "timed out" in res[0]["error"] and res[1]["error"].startswith("skipped")


@pytest.mark.skipif(not HAS_MLX, reason="MLX is not installed")
@pytest.mark.parametrize("kind", ["gma", "softmax"])
def test_mlx_compiled_series_times_the_same_computation(kind):
    """The "mlx-compiled" series runs the forward and the gradient step under mx.compile; both give what
    the eager series gives, and repeated calls keep the module's weights (a traced call must not leave
    placeholders in it)."""
    import mlx.core as mx

    spec = dict(kind=kind, batch=2, d_model=32, heads=2, components=4, features=None, causal=True)
    eager = bench._mlx_callables({**spec, "framework": "mlx"})
    compiled = bench._mlx_callables({**spec, "framework": "mlx-compiled"})
    x = eager[0](24)
    for _ in range(2):
        np.testing.assert_allclose(compiled[1](x), eager[1](x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(compiled[2](x), eager[2](x), rtol=1e-5, atol=1e-7)
    mx.eval(x)


@pytest.mark.skipif(not HAS_MLX, reason="MLX is not installed")
def test_quick_run_with_compiled_mlx_series(tmp_path, capsys):
    rc = bench.main(["--quick", "--frameworks", "mlx,mlx-compiled", "--kinds", "gma", "--n", "32",
                     "--no-memory", "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert sorted(r["framework"] for r in results) == ["mlx", "mlx-compiled"]
    for r in results:
        assert "error" not in r, r
        assert r["forward_ms"] > 0 and r["train_ms"] > 0
    assert "[mlx-compiled] forward" in capsys.readouterr().out
    assert bench.main(["--quick", "--frameworks", "jax", "--out", str(tmp_path)]) == 2
