"""Memory exhaustion and the CPU buffer cache's edges: a call that cannot get its working memory
raises MemoryError (naming what it asked for) and the process goes on; huge-page advice goes only
to the cache's own blocks; sizes near 2^64 are refused."""

from __future__ import annotations

import mmap
import subprocess
import sys

import numpy as np
import pytest

from gmattn import _ext
from gmattn.testing import UNDER_ADDRESS_SANITIZER

# A child process: builds the inputs and outputs of one core call whose per-head working memory
# (H = 2 heads of K x D = 2048 x 2048: about 80 MiB each) does not fit in the 48 MiB of address
# space left to it, makes the call, then makes a small call to show that it lives on.
_CHILD = r"""
import resource, sys
import numpy as np
import gmattn
from gmattn import _ext, numpy_ops

PASS = sys.argv[1]
core = _ext.core()
rng = np.random.default_rng(0)
B, N, H, K, D, Dv = 1, 64, 2, 2048, 2048, 8
f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
q, k, v, dout = f32(B, N, H, D), f32(B, N, H, D), f32(B, N, H, Dv), f32(B, N, H, Dv)
mu, omega, alpha = f32(H, K, D), f32(H, K, D), f32(H, K)
common = dict(causal=True, eps=1e-6, sigma_eps=1e-4, num_threads=2, stream=0)
out = np.empty((B, N, H, Dv), np.float32)
gq, gk = np.empty((B, H, N, K), np.float32), np.empty((B, H, N, K), np.float32)
den = np.empty((B, H, N), np.float32)
grads = [np.empty_like(x) for x in (q, k, v, mu, omega, alpha)]
small = lambda: numpy_ops.gma_attention(q[:, :, :, :4], k[:, :, :, :4], v, mu[:, :4, :4], omega[:, :4, :4],
                                        alpha[:, :4], causal=True, num_threads=2)
small()  # the OpenMP threads exist before the limit
if PASS == "backward":
    core.forward(q, k, v, mu, omega, alpha, None, None, None, out, None, None, gq, gk, den, **common)
vm = [int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmSize:")][0]
resource.setrlimit(resource.RLIMIT_AS, (vm + (48 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    if PASS == "forward":
        core.forward(q, k, v, mu, omega, alpha, None, None, None, out, None, None, gq, gk, den, **common)
    else:
        core.backward(q, k, v, mu, omega, alpha, None, None, None, out, gq, gk, den, dout, None, None, *grads,
                      None, None, **common)
    print("no error")
except MemoryError as exc:
    print("MemoryError:", exc)
print("small call finite:", bool(np.isfinite(small()).all()))
# The kernels flush subnormals to zero; the failed call handed the caller's setting back.
print("subnormals after the error:", bool(np.float32(1e-38) * np.float32(1e-3) != 0))
"""


@pytest.mark.skipif(UNDER_ADDRESS_SANITIZER, reason="AddressSanitizer needs more address space than the limit leaves")
@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_out_of_memory_raises_memory_error_and_the_process_lives_on(kernel):
    proc = subprocess.run([sys.executable, "-c", _CHILD, kernel], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the process died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("MemoryError: gmattn: the CPU " + kernel + " ran out of memory"), proc.stdout
    assert "K=2048, D=2048" in lines[0] and "MiB of working memory failed" in lines[0], lines[0]
    assert lines[1] == "small call finite: True", proc.stdout
    assert lines[2] == "subnormals after the error: True", proc.stdout


def _vm_flags(lo: int, hi: int):
    """The VmFlags of every mapping of this process that overlaps [lo, hi) (/proc/self/smaps)."""
    flags, overlaps = [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                overlaps = start < hi and lo < end
            elif head == "VmFlags:" and overlaps:
                flags.append(line.split()[1:])
    return flags


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_huge_page_advice_only_on_the_cache_blocks():
    """The buffer cache asks for transparent huge pages on its blocks of 2 MiB or more (VmFlags
    'hg'); the caller's output memory, a fresh mapping here, is left as it is."""
    core = _ext.core()
    block = np.frombuffer(core.cpu_buffer(8 << 20), dtype=np.uint8)
    lo = block.ctypes.data
    if not all("hg" in f for f in _vm_flags(lo, lo + block.nbytes)):
        pytest.skip("madvise(MADV_HUGEPAGE) is not observable here (no THP in this kernel, or GMATTN_HUGEPAGES=0)")
    B, N, H, D, Dv, K = 1, 16384, 2, 8, 64, 4
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((B, N, H, D)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((B, N, H, Dv)).astype(np.float32)
    mu, omega, alpha = (rng.standard_normal(s).astype(np.float32) for s in ((H, K, D), (H, K, D), (H, K)))
    memory = mmap.mmap(-1, B * N * H * Dv * 4)  # 8 MiB, 4 whole huge pages
    out = np.frombuffer(memory, dtype=np.float32).reshape(B, N, H, Dv)
    core.forward(q, k, v, mu, omega, alpha, None, None, None, out, None, None, None, None, None, causal=True,
                 eps=1e-6, sigma_eps=1e-4)
    assert np.isfinite(out).all()
    flags = _vm_flags(out.ctypes.data, out.ctypes.data + out.nbytes)
    assert flags and not any("hg" in f for f in flags), flags
    del out
    memory.close()


@pytest.mark.parametrize("size", [2**64 - 1, 2**64 - 2**20, 2**63 + 1])
def test_buffer_cache_refuses_sizes_beyond_the_address_space(size):
    """Sizes whose rounding up to whole pages would wrap past 2^64 (once a zero-byte block that
    advertised a huge length), and sizes no allocator can give, raise MemoryError."""
    with pytest.raises(MemoryError, match="gmattn: a buffer of"):
        _ext.core().cpu_buffer(size)
