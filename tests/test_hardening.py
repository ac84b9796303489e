"""Long-running-service properties: concurrency, leaks, NaN policy, numerics at the edges,
linkage and imports."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import gmattn
from gmattn import reference
from gmattn.torch.ops import forward_op
from gmattn.testing import UNDER_ADDRESS_SANITIZER

from conftest import make_problem


def _numpy_args(seed, N=300, dtype=np.float32):
    p = make_problem(2, N, 3, 8, 8, 8, dtype=torch.float64, seed=seed)
    arrays = [t.detach().numpy().astype(dtype) for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)]
    return arrays, p.mask


def _run_in_threads(n, work):
    """work(0), ..., work(n - 1) in n Python threads released together; re-raises their errors."""
    errors = []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait()
            work(i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_concurrent_calls_match_serial():
    """8 Python threads calling the op at once (GIL released in the kernels) give serial results."""
    inputs = [_numpy_args(seed) for seed in range(8)]
    serial = [gmattn.gma_attention(*a, causal=bool(i % 2)) for i, (a, _) in enumerate(inputs)]
    results = [None] * 8

    def work(i):
        for _ in range(5):
            results[i] = gmattn.gma_attention(*inputs[i][0], causal=bool(i % 2))

    _run_in_threads(8, work)
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_concurrent_backward_matches_serial():
    problems = [make_problem(2, 150, 2, 8, 8, 8, dtype=torch.float32, mask=True, seed=s) for s in range(4)]

    def grads(p):
        out = gmattn.gma_attention(p.q, p.k, p.v, p.mu, p.omega, p.alpha, causal=True, key_padding_mask=p.mask)
        return torch.autograd.grad(out.square().sum(), p.tensors())

    serial = [grads(p) for p in problems]
    results = [None] * 4

    def work(i):
        results[i] = grads(problems[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.skipif(UNDER_ADDRESS_SANITIZER, reason="measures memory, which AddressSanitizer distorts")
def test_rss_flat_over_many_calls():
    """10,000 forward calls plus 2,000 forward+backward calls leak nothing measurable."""
    from gmattn.numpy_ops import gma_attention as gma_numpy

    args, _ = _numpy_args(0, N=16)
    p = make_problem(1, 16, 2, 4, 4, 4, dtype=torch.float32, state=True)

    def torch_step():
        out, (S, z) = gmattn.gma_attention(p.q, p.k, p.v, p.mu, p.omega, p.alpha, causal=True,
                                           initial_state=p.state, output_final_state=True)
        torch.autograd.grad(out.sum() + S.sum(), p.tensors())

    # one thread: the test measures leaks, not OpenMP wake-ups on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # warm up allocator pools, and torch's one-time set-up of the op and autograd (~76 MiB the
        # first time, when this test runs on its own)
        for _ in range(200):
            gma_numpy(*args, causal=True, num_threads=1)
            torch_step()
        before = _rss_bytes()
        for i in range(10_000):
            gma_numpy(*args, causal=bool(i % 2), output_final_state=True, num_threads=1)
        for _ in range(2000):
            torch_step()
    finally:
        torch.set_num_threads(threads)
    growth = _rss_bytes() - before
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 12,000 calls"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_causal_results_bit_identical_across_thread_counts(dtype):
    """With fewer (batch, head) pairs than threads the causal scans run as relays between threads
    (cpp/cpu/plan.h, Relay): the state crosses from thread to thread but is summed in the order of one
    thread's scan, and the parameter sums are summed over the same blocks of chunks and combined in
    that order too, so outputs, final states, saved responsibilities and every gradient are
    bit-identical whatever the thread count (masked, with an initial state and a loss on the final
    state; 15 chunks: a last block of three chunks, the last of them ragged)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # parameters and states
    p = make_problem(1, 900, 3, 7, 5, 6, mask=True, state=True, dtype=acc, seed=21)
    leaves = [p.q.detach().to(dtype).requires_grad_(), p.k.detach().to(dtype).requires_grad_(),
              p.v.detach().to(dtype).requires_grad_(), p.mu, p.omega, p.alpha, *p.state]
    g = torch.randn(p.q.shape[:3] + (6,), generator=torch.Generator().manual_seed(5), dtype=acc).to(dtype)
    results = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 4, 7):  # 3 pairs: relays at 2, 4 and 7 threads
            torch.set_num_threads(threads)
            saved = forward_op(*leaves[:3], *[t.detach() for t in leaves[3:6]], p.mask,
                               *[t.detach() for t in leaves[6:]], True, 1e-6, 1e-4, True, True)
            out, (S, z) = gmattn.gma_attention(*leaves[:6], causal=True, key_padding_mask=p.mask,
                                               initial_state=tuple(leaves[6:]), output_final_state=True)
            grads = torch.autograd.grad((out.float() * g.float()).sum() + S.sum() - z.sum(), leaves)
            results[threads] = [*saved, *grads]
    finally:
        torch.set_num_threads(before)
    for threads, got in results.items():
        for a, b in zip(got, results[1]):
            assert torch.equal(a, b), f"{threads} threads differ from one"


def test_concurrent_relays_match_serial_results():
    """Python threads running relays at once (one pair on two OpenMP threads each: every call hands
    states between its own threads) match their serial results."""
    from gmattn.numpy_ops import gma_attention as gma_numpy

    problems = []
    for seed, N in enumerate([700, 900, 1100, 1300]):
        p = make_problem(1, N, 1, 8, 8, 8, dtype=torch.float32, seed=seed)
        problems.append([t.detach().numpy() for t in (p.q, p.k, p.v, p.mu, p.omega, p.alpha)])

    def run(arrays):
        out, (S, z) = gma_numpy(*arrays, causal=True, output_final_state=True, num_threads=2)
        return out, S, z

    serial = [run(a) for a in problems]
    results = [[] for _ in problems]

    def work(i):
        for r in range(6):  # each thread cycles through all sizes: blocks change hands
            j = (i + r) % len(problems)
            results[j].append(run(problems[j]))

    _run_in_threads(len(problems), work)
    for want, got in zip(serial, results):
        assert got
        for g in got:
            for a, b in zip(g, want):
                np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults with getrusage")
def test_large_torch_outputs_reuse_released_blocks():
    """CPU outputs of 1 MiB and more come from the core's buffer cache: a call's 32 MiB output
    reuses the block an earlier call released (no fresh pages to fault); results equal those with
    the cache off; .grad accumulates over two backward passes into a cached block like into any
    tensor."""
    script = (
        "import sys, resource, torch; sys.path.insert(0, sys.argv[1]); import gmattn;"
        "from conftest import make_problem;"
        "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt;"
        "torch.manual_seed(0); B, N, H, D, K = 1, 65536, 8, 16, 8;"  # out: 32 MiB
        "q, k, v = (torch.randn(B, N, H, D) for _ in range(3));"
        "mu, omega, alpha = torch.randn(H, K, D), torch.randn(H, K, D), torch.randn(H, K);"
        "f = lambda: gmattn.gma_attention(q, k, v, mu, omega, alpha);"
        "out = f(); del out; before = faults(); out = f(); fresh_pages = faults() - before;"
        "p = make_problem(1, 4096, 4, 8, 16, 16, dtype=torch.float32, seed=3);"  # q, out, dq: 1 MiB each
        "o = gmattn.gma_attention(p.q, p.k, p.v, p.mu, p.omega, p.alpha, causal=True);"
        "g = torch.autograd.grad(o.square().sum(), p.tensors());"
        "torch.save([fresh_pages, out, o, *g], sys.argv[2])"
    )
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mib in ("0", "512"):
            path = os.path.join(tmp, f"res{mib}.pt")
            env = dict(os.environ, GMATTN_BUFFER_CACHE_MIB=mib)
            res = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), path], env=env,
                                 capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr[-3000:]
            results[mib] = torch.load(path)
    # a fresh 32 MiB output would fault 8192 pages of 4 KiB (fewer with huge pages)
    assert results["512"][0] < 1024, results["512"][0]
    for a, b in zip(results["512"][1:], results["0"][1:]):
        assert torch.equal(a, b)

    p = make_problem(1, 4096, 4, 8, 16, 16, dtype=torch.float32, seed=3)
    leaves = [x.detach().clone().requires_grad_() for x in p.tensors()]
    for _ in range(2):  # .grad accumulates in place into a cached block
        out = gmattn.gma_attention(*leaves, causal=True)
        out.square().sum().backward()
    for leaf, g in zip(leaves, results["512"][3:]):
        torch.testing.assert_close(leaf.grad, 2 * g, rtol=1e-5, atol=1e-5)


def test_buffer_cache_hands_back_the_released_block():
    """A released block is kept as it is and handed to the next request of its size (in a fresh
    process, where glibc would unmap a 32 MiB block on free and map zeroed pages again)."""
    script = (
        "import numpy as np; import gmattn._ext as e; core = e.core();"
        "b = core.cpu_buffer(32 << 20); a = np.frombuffer(b, np.uint8); a[:8] = 171; p = a.ctypes.data;"
        "del a, b;"
        "b = core.cpu_buffer(32 << 20); a = np.frombuffer(b, np.uint8);"
        "print(int(a.ctypes.data == p and (a[:8] == 171).all()))"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, GMATTN_BUFFER_CACHE_MIB="512"))
    assert res.returncode == 0 and res.stdout.strip() == "1", res.stderr[-3000:]


def test_empty_cache_returns_kept_blocks_and_the_budget_is_reported():
    """gmattn.empty_cache() hands every kept block back (blocks in use stay valid) and reports
    their bytes; the budget is GMATTN_BUFFER_CACHE_MIB, or by default an eighth of the physical
    memory and at least 512 MiB (in fresh processes: the budget is read once)."""
    script = (
        "import os, numpy as np, gmattn, gmattn._ext as e; core = e.core();"
        "kept = core.cpu_buffer(8 << 20); a = np.frombuffer(kept, np.uint8); a[:] = 7;"
        "gone = core.cpu_buffer(16 << 20); del gone;"
        "held = gmattn.buffer_cache_info()['held_bytes'];"
        "freed = gmattn.empty_cache(); after = gmattn.buffer_cache_info();"
        "phys = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGESIZE');"
        "print(held, freed, after['held_bytes'], after['budget_bytes'], phys, int((a == 7).all()))"
    )
    for setting in (None, "64"):
        env = dict(os.environ)
        env.pop("GMATTN_BUFFER_CACHE_MIB", None)
        if setting is not None:
            env["GMATTN_BUFFER_CACHE_MIB"] = setting
        res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        held, freed, after, budget, phys, intact = map(int, res.stdout.split())
        assert held == freed == 16 << 20 and after == 0 and intact == 1
        want = max(512 << 20, phys // 8) if setting is None else int(setting) << 20
        assert budget == want


def test_buffer_cache_setting_is_checked():
    env = dict(os.environ, GMATTN_BUFFER_CACHE_MIB="lots")
    script = "import gmattn._ext as e; e.core().cpu_buffer(1 << 20)"
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "GMATTN_BUFFER_CACHE_MIB" in res.stderr


def test_nan_reaches_only_the_outputs_it_feeds():
    p = make_problem(1, 100, 2, 4, 4, 4, dtype=torch.float64, seed=1)
    q, k, v = (t.detach().clone() for t in (p.q, p.k, p.v))
    q[0, 30, 1, 2] = float("nan")
    out = gmattn.gma_attention(q, k, v, p.mu.detach(), p.omega.detach(), p.alpha.detach(), causal=True)
    bad = torch.isnan(out).any(-1)  # (B, N, H)
    assert bad[0, 30, 1] and bad.sum() == 1, "a NaN query row poisons only its own output"

    q, k, v = (t.detach().clone() for t in (p.q, p.k, p.v))
    v[0, 60, 0, 0] = float("nan")
    out = gmattn.gma_attention(q, k, v, p.mu.detach(), p.omega.detach(), p.alpha.detach(), causal=True)
    bad = torch.isnan(out).any(-1)
    assert not bad[0, :60].any() and bad[0, 60:, 0].all() and not bad[0, :, 1].any(), \
        "a NaN value row poisons outputs at and after it in its head only (causal)"


def test_extreme_but_finite_inputs_stay_finite_and_accurate():
    """|x| up to 1e3, sigma2 at sigma_eps, alpha spread of 50: no NaN/Inf, float32 close to float64."""
    g = torch.Generator().manual_seed(0)
    B, N, H, K, D, Dv = 1, 200, 2, 8, 4, 4
    q = (torch.randn(B, N, H, D, generator=g, dtype=torch.float64) * 1e3)
    k = (torch.randn(B, N, H, D, generator=g, dtype=torch.float64) * 1e3)
    v = torch.randn(B, N, H, Dv, generator=g, dtype=torch.float64)
    mu = torch.randn(H, K, D, generator=g, dtype=torch.float64) * 1e3
    omega = torch.full((H, K, D), -40.0, dtype=torch.float64)  # softplus(-40) ~ 4e-18: sigma2 = sigma_eps
    omega[:, ::2] = 5.0
    alpha = torch.linspace(-25, 25, K, dtype=torch.float64).repeat(H, 1)
    for causal in (False, True):
        want = reference.naive_gma(q, k, v, mu, omega, alpha, causal=causal)
        got64 = gmattn.gma_attention(q, k, v, mu, omega, alpha, causal=causal)
        got32 = gmattn.gma_attention(*(t.float() for t in (q, k, v, mu, omega, alpha)), causal=causal)
        assert torch.isfinite(got64).all() and torch.isfinite(got32).all()
        torch.testing.assert_close(got64, want, rtol=1e-9, atol=1e-9)
        # float32 routing at |x| = 1e3 with sigma2 = 1e-4 has log-densities of 1e10: the
        # responsibilities are one-hot in both precisions, so outputs agree closely
        assert (got32.double() - want).abs().max() < 1e-3 * want.abs().max()


def test_core_links_no_torch_or_mlx():
    import gmattn._core as core

    path = core.__file__
    res = subprocess.run(["readelf", "-d", path], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("readelf unavailable")
    needed = [line for line in res.stdout.splitlines() if "(NEEDED)" in line]
    assert needed, res.stdout
    joined = "\n".join(needed)
    for lib in ("libtorch", "libc10", "libmlx", "libpython"):
        assert lib not in joined, f"{path} links {lib}:\n{joined}"


def test_import_without_torch_keeps_numpy_path():
    script = (
        "import sys; sys.modules['torch'] = None\n"  # importing torch now raises ImportError
        "import numpy as np, gmattn\n"
        "q = np.random.rand(1, 8, 2, 4).astype(np.float32)\n"
        "v = np.random.rand(1, 8, 2, 3).astype(np.float32)\n"
        "mu = np.random.rand(2, 5, 4).astype(np.float32)\n"
        "out = gmattn.gma_attention(q, q, v, mu, mu, np.zeros((2, 5), np.float32), causal=True)\n"
        "assert out.shape == (1, 8, 2, 3) and np.isfinite(out).all()\n"
        "try:\n"
        "    import gmattn.torch\n"
        "except ImportError as e:\n"
        "    print('torch-missing:', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch-missing:" in res.stdout and "gmattn.torch needs PyTorch" in res.stdout
