"""The benchmark scripts run end to end (tiny sizes) and write what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_benchmark_quick(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu.py"), "--quick", "--targets", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["quick"] is True
    for section in ("speed", "matmul", "scaling", "shapes", "threads", "memory"):
        assert section in data and data[section], section
    assert data["matmul"]["gflops"] > 0
    assert all("met" in t and "value" in t for t in data["targets"])
    for png in ("time_vs_n.png", "matmul_fraction.png", "memory_vs_n.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    assert "Targets" in res.stdout
    tables = (tmp_path / "results.md").read_text()
    assert "| N | mode |" in tables and "Targets" in tables
    # --report redraws tables and plots from the JSON alone
    (tmp_path / "results.md").unlink()
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu.py"), "--report", str(tmp_path / "results.json"),
                          "--targets"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "results.md").read_text() == tables


def test_run_cell_turns_repeat_short_calls():
    """run_cell: every callable gets `repeats` turns, interleaved; with min_seconds a short call
    repeats within its turn (each call a sample), a long one runs once a turn."""
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("bench_cpu", REPO / "benchmarks" / "cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    order = []

    def sleeper(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)
        return call

    times = bench.run_cell({"short": sleeper("short", 0.002), "long": sleeper("long", 0.05)}, 3, min_seconds=0.03)
    assert len(times["long"]) == 3  # once a turn: 0.05 s already fills it
    assert len(times["short"]) >= 3 * 4  # about 15 calls a turn (0.03 / 0.002); fewer on a busy machine
    assert all(t >= 0.002 for t in times["short"]) and all(t >= 0.05 for t in times["long"])
    turns = [name for i, name in enumerate(order[2:]) if i == 0 or order[2:][i - 1] != name]
    assert turns == ["short", "long"] * 3  # warm-ups first, then the rounds, interleaved
    plain = bench.run_cell({"a": sleeper("a", 0.001)}, 4)
    assert len(plain["a"]) == 4


def test_gpu_check_without_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine the script itself is the check
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--skip-tests"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA GPU" in res.stdout


def _compare_module():
    import importlib.util

    sys.path.insert(0, str(REPO / "benchmarks"))  # compare.py imports its neighbour cpu.py
    try:
        spec = importlib.util.spec_from_file_location("bench_compare", REPO / "benchmarks" / "compare.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def test_compare_verdict_follows_the_measurements():
    """The main job's verdict is computed: where GMA wins, by how much, and where it does not."""
    compare = _compare_module()

    def rec(impl, n, train_ms, peak):
        return {"impl": impl, "n": n, "forward_ms": train_ms / 3, "train_ms": train_ms, "train_peak_mib": peak}

    results = [rec("gma", n, 1.0 * n / 256 + 2.0, n / 64) for n in (256, 1024, 4096)]
    results += [rec("softmax", n, (n / 256) ** 2, n / 128) for n in (256, 1024, 4096)]
    results += [rec("chunked", n, 5.0 * n / 256, n / 16) for n in (256, 1024, 4096)]
    text = compare.speed_sentence(results, "train", "softmax")
    # gma 3 / 6 / 18 ms against softmax 1 / 16 / 256 ms: slower at 256 (3x), faster from 1k (2.7x) to 4k (14x)
    assert "faster from N=1k on, 2.7x at N=1k and 14x at N=4k" in text and "slower at N=256 (3.0x slower" in text
    flipped = [dict(r, train_ms=1.0 / r["train_ms"]) for r in results]
    assert "faster at N=256 only; slower at N=1k, 4k (14x slower at N=4k)" in compare.speed_sentence(
        flipped, "train", "softmax")
    slow = [dict(r, train_ms=r["train_ms"] * 1000) if r["impl"] == "gma" else r for r in results]
    assert "slower at every N measured" in compare.speed_sentence(slow, "train", "softmax")
    memory = compare.memory_sentence(results)
    assert "GMA 64 MiB" in memory and "softmax attention needs 2.0x less (32 MiB)" in memory
    assert "gma ~N^1.0" in memory


def test_compare_runs_end_to_end(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare.py"), "--n", "64,128", "--long-n", "256",
                          "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert {(r["impl"], r["n"]) for r in data["results"]} == {
        (impl, n) for impl in ("gma", "softmax", "chunked") for n in (64, 128)} | {("gma", 256), ("chunked", 256)}
    assert all(r["train_ms"] > 0 and r["forward_ms"] > 0 for r in data["results"])
    assert data["verdict"] and "Verdict" in res.stdout
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
