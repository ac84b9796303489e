"""The CUDA module's front door, without a GPU: gmattn._cuda's bindings and host code, built on
the CPU emulation of the kernels (cpp/cuda/emulation/build.sh --module), called with arrays from a
DLPack producer that follows torch's rules for CUDA tensors exactly:

- __dlpack__(stream=0) raises AssertionError ("unsupported stream on CUDA: 0"), stream=2 (the
  per-thread default stream) BufferError; 1 names the legacy default stream, other values a stream;
- a tensor exports only while its device is the current one (BufferError otherwise).

Checked: every tensor argument of forward and backward is exported on the caller's stream under
the DLPack numbering (the default stream, handle 0, as 1), while its device is current (tensors
on a GPU that is not the current one work, and the current device is restored after the call);
the workspace comes from the caller's allocator when one is given; GMATTN_CUDA_SYNC=1 names the
kernel that faulted. What only a GPU shows (a real stream's ordering, torch's caching allocator,
a real fault) is in tests/test_cuda.py.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gmattn.reference import naive_gma, packed_gma

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "cpp" / "cuda" / "emulation" / "build.sh"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or not (CUDA_HOME / "include" / "cuda_bf16.h").exists()
    or importlib.util.find_spec("pybind11") is None,
    reason="needs g++, pybind11 and the CUDA headers (CUDA_HOME)",
)

kDLCUDA = 2


@pytest.fixture(scope="module")
def cuda_module(tmp_path_factory):
    """gmattn._cuda's sources (bindings, host code, kernels) built on the emulator, imported."""
    out = tmp_path_factory.mktemp("cuda_frontdoor")
    res = subprocess.run(["bash", str(BUILD), "--module", str(out)], capture_output=True, text=True,
                         timeout=1200, env=dict(os.environ, PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr[-4000:]
    path = next(out.glob("_cuda_emulated*.so"))
    spec = importlib.util.spec_from_file_location("_cuda_emulated", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.device == "CUDA"
    return module


@pytest.fixture
def runtime(cuda_module, monkeypatch):
    """The emulated runtime, reset around each test: two devices, device 0 current, no fault."""
    emu = cuda_module.emulation
    monkeypatch.delenv("GMATTN_CUDA_SYNC", raising=False)
    emu.set_device_count(2)
    emu.set_current_device(0)
    emu.set_fault_kernel("")
    yield emu
    emu.set_fault_kernel("")
    emu.set_current_device(0)
    emu.set_device_count(1)


_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype = ctypes.c_char_p
_capsule_name.argtypes = [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _set_capsule_device(capsule, device_type: int, device_id: int) -> None:
    """Rewrites DLTensor.device of a DLPack capsule (the emulated GPU's memory is host memory)."""
    name = _capsule_name(capsule)
    managed = _capsule_pointer(capsule, name)
    # DLManagedTensorVersioned: version (8 bytes), manager_ctx, deleter, flags, then the DLTensor;
    # the legacy DLManagedTensor starts with it. DLTensor: data pointer, then device (two int32).
    tensor = managed + (32 if name == b"dltensor_versioned" else 0)
    ctypes.c_int32.from_address(tensor + 8).value = device_type
    ctypes.c_int32.from_address(tensor + 12).value = device_id


class FakeCudaArray:
    """A NumPy array presented as a CUDA array on `device`, exported under torch's rules."""

    def __init__(self, name, array, device, runtime, log):
        self.name, self.array, self.device, self.runtime, self.log = name, array, device, runtime, log

    def __dlpack_device__(self):
        return (kDLCUDA, self.device)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        # The checks of torch.Tensor.__dlpack__ for a CUDA tensor, in its order.
        if self.device != self.runtime.current_device():
            raise BufferError("Can't export tensors on a different CUDA device index. "
                              f"Expected: {self.device}. Current device: {self.runtime.current_device()}.")
        if stream is not None and type(stream) is not int:
            raise TypeError("stream must be ``int`` or ``none``")
        if stream == 2:
            raise BufferError("per-thread default stream is not supported.")
        if stream == 0:
            raise AssertionError(f"unsupported stream on CUDA: {stream}.")
        self.log.append((self.name, stream, self.runtime.current_device()))
        capsule = self.array.__dlpack__(max_version=max_version) if max_version else self.array.__dlpack__()
        _set_capsule_device(capsule, kDLCUDA, self.device)
        return capsule


B, N, H, K, D, DV = 2, 40, 2, 5, 4, 3
FORWARD_INPUTS = ("q", "k", "v", "mu", "omega", "alpha", "mask", "S0", "z0")


def _problem(seed=0, N=N):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mask = torch.rand(B, N, generator=g) > 0.2
    return dict(q=rand(B, N, H, D), k=rand(B, N, H, D), v=rand(B, N, H, DV), mu=rand(H, K, D),
                omega=rand(H, K, D) * 0.5, alpha=rand(H, K), mask=mask, S0=rand(B, H, K, DV).abs(),
                z0=rand(B, H, K).abs() + 0.5, dout=rand(B, N, H, DV), dS=rand(B, H, K, DV), dz=rand(B, H, K))


def _workspace_kw(allocate_workspace):
    return {} if allocate_workspace is None else {"allocate_workspace": allocate_workspace}


class Caller:
    """Calls the module's forward and backward on fake CUDA arrays of one problem; every array it
    hands over is logged (name, stream asked, current device) when exported."""

    def __init__(self, module, runtime, device=0, seed=0, n=N, dtype=np.float64):
        """dtype: of every array (float32 inputs keep float32 parameters and state)."""
        self.module, self.runtime, self.device, self.n, self.dtype = module, runtime, device, n, dtype
        self.p = _problem(seed, n)
        self.log = []
        self.workspace_requests = []

    def wrap(self, name, array, device=None):
        return FakeCudaArray(name, array, self.device if device is None else device, self.runtime, self.log)

    def arg(self, name, devices=None):
        a = self.p[name].numpy()
        return self.wrap(name, a.astype(np.uint8 if a.dtype == np.bool_ else self.dtype), (devices or {}).get(name))

    def output(self, name, shape):
        """An output array filled with NaN (unwritten elements show)."""
        return self.wrap(name, np.full(shape, np.nan, self.dtype))

    def allocator(self, shortfall=0):
        def allocate(nbytes):
            self.workspace_requests.append((nbytes, self.runtime.current_device()))
            return self.wrap("workspace", np.full(nbytes - shortfall, 0xFF, np.uint8))
        return allocate

    def forward(self, *, causal, stream=0, allocate_workspace=None, devices=None, save=True):
        """save=False: no gq, gk, den (the forward of a call that needs no gradient)."""
        N = self.n
        outs = dict(out=self.output("out", (B, N, H, DV)), S_final=self.output("S_final", (B, H, K, DV)),
                    z_final=self.output("z_final", (B, H, K)))
        if save:
            outs.update(gq=self.output("gq", (B, H, N, K)), gk=self.output("gk", (B, H, N, K)),
                        den=self.output("den", (B, H, N)))
        saved = () if save else (None, None, None)
        self.module.forward(*(self.arg(n, devices) for n in FORWARD_INPUTS), *outs.values(), *saved, causal=causal,
                            eps=1e-6, sigma_eps=1e-4, stream=stream, **_workspace_kw(allocate_workspace))
        return {n: a.array for n, a in outs.items()}

    def backward(self, fwd, *, causal, stream=0, allocate_workspace=None):
        N = self.n

        def saved(name):
            return self.wrap(name, fwd[name])

        grads = dict(dq=self.output("dq", (B, N, H, D)), dk=self.output("dk", (B, N, H, D)),
                     dv=self.output("dv", (B, N, H, DV)), dmu=self.output("dmu", (H, K, D)),
                     domega=self.output("domega", (H, K, D)), dalpha=self.output("dalpha", (H, K)),
                     dS0=self.output("dS0", (B, H, K, DV)), dz0=self.output("dz0", (B, H, K)))
        self.module.backward(
            *(self.arg(n) for n in FORWARD_INPUTS), saved("out"), saved("gq"), saved("gk"), saved("den"),
            self.arg("dout"), self.arg("dS"), self.arg("dz"), *grads.values(), causal=causal, eps=1e-6,
            sigma_eps=1e-4, stream=stream, S_end=None if causal else saved("S_final"),
            z_end=None if causal else saved("z_final"), **_workspace_kw(allocate_workspace))
        return {n: a.array for n, a in grads.items()}


def _reference(p, causal):
    """out, final state and every gradient from the float64 naive reference and autograd."""
    names = ("q", "k", "v", "mu", "omega", "alpha", "S0", "z0")
    x = {n: p[n].clone().requires_grad_(True) for n in names}
    out, (S, z) = naive_gma(x["q"], x["k"], x["v"], x["mu"], x["omega"], x["alpha"], causal=causal,
                            key_padding_mask=p["mask"], initial_state=(x["S0"], x["z0"]),
                            output_final_state=True)
    loss = (out * p["dout"]).sum() + (S * p["dS"]).sum() + (z * p["dz"]).sum()
    grads = torch.autograd.grad(loss, [x[n] for n in names])
    ref = dict(out=out, S_final=S, z_final=z)
    ref.update({"d" + n: g for n, g in zip(("q", "k", "v", "mu", "omega", "alpha", "S0", "z0"), grads)})
    return {n: t.detach().numpy() for n, t in ref.items()}


def _assert_matches_reference(p, causal, fwd, grads):
    ref = _reference(p, causal)
    for name, got in list(fwd.items()) + list(grads.items()):
        if name in ref:
            np.testing.assert_allclose(got, ref[name], rtol=1e-9, atol=1e-11, err_msg=name)


FORWARD_ARRAYS = set(FORWARD_INPUTS) | {"out", "S_final", "z_final", "gq", "gk", "den"}
BACKWARD_ARRAYS = set(FORWARD_INPUTS) | {"out", "gq", "gk", "den", "dout", "dS", "dz", "dq", "dk", "dv", "dmu",
                                         "domega", "dalpha", "dS0", "dz0"}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("stream, dlpack_stream", [(0, 1), (1, 1), (0x7F3A_0000_1230, 0x7F3A_0000_1230)])
def test_every_array_is_exported_on_the_callers_stream(cuda_module, runtime, causal, stream, dlpack_stream):
    """The default stream (handle 0, what torch reports for it, or cudaStreamLegacy = 1) is asked
    for as DLPack's 1; any other stream by its handle; never 0 or 2, which torch refuses."""
    c = Caller(cuda_module, runtime)
    fwd = c.forward(causal=causal, stream=stream)
    assert {name for name, _, _ in c.log} == FORWARD_ARRAYS
    assert {s for _, s, _ in c.log} == {dlpack_stream}
    c.log.clear()
    grads = c.backward(fwd, causal=causal, stream=stream)
    expected = BACKWARD_ARRAYS | (set() if causal else {"S_final", "z_final"})  # S_end, z_end
    assert {name for name, _, _ in c.log} == expected
    assert {s for _, s, _ in c.log} == {dlpack_stream}
    _assert_matches_reference(c.p, causal, fwd, grads)


def test_a_negative_stream_is_refused(cuda_module, runtime):
    with pytest.raises(ValueError, match="'stream' must be a CUDA stream handle"):
        Caller(cuda_module, runtime).forward(causal=True, stream=-1)


@pytest.mark.parametrize("causal", [False, True])
def test_arrays_on_a_device_that_is_not_current(cuda_module, runtime, causal):
    """Arrays on device 1 while device 0 is current: each is exported (and the workspace
    allocated) with device 1 current, and device 0 is current again after each call."""
    c = Caller(cuda_module, runtime, device=1)
    fwd = c.forward(causal=causal, allocate_workspace=c.allocator())
    assert runtime.current_device() == 0
    grads = c.backward(fwd, causal=causal, allocate_workspace=c.allocator())
    assert runtime.current_device() == 0
    assert c.log and {dev for _, _, dev in c.log} == {1}
    assert len(c.workspace_requests) == 2 and {dev for _, dev in c.workspace_requests} == {1}
    _assert_matches_reference(c.p, causal, fwd, grads)


def test_an_array_on_another_device_than_q_is_named(cuda_module, runtime):
    c = Caller(cuda_module, runtime, device=1)
    with pytest.raises(ValueError, match="'k' is on CUDA device 0, expected device 1 like q"):
        c.forward(causal=False, devices={"k": 0})
    assert runtime.current_device() == 0


@pytest.mark.parametrize("causal", [False, True])
def test_workspace_comes_from_the_callers_allocator(cuda_module, runtime, causal):
    """With an allocator the core asks it once per call (for the bytes it reports) and allocates
    nothing itself; the results are the same bits as with the core's own allocation."""
    own = Caller(cuda_module, runtime)
    before = runtime.async_allocations()
    fwd_own = own.forward(causal=causal)
    grads_own = own.backward(fwd_own, causal=causal)
    assert runtime.async_allocations() == before + 2

    c = Caller(cuda_module, runtime)
    before = runtime.async_allocations()
    fwd = c.forward(causal=causal, allocate_workspace=c.allocator())
    grads = c.backward(fwd, causal=causal, allocate_workspace=c.allocator())
    assert runtime.async_allocations() == before
    assert len(c.workspace_requests) == 2 and all(n > 0 for n, _ in c.workspace_requests)
    for name in fwd:
        np.testing.assert_array_equal(fwd[name], fwd_own[name], err_msg=name)
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads_own[name], err_msg=name)


def test_a_workspace_that_is_too_small_is_refused(cuda_module, runtime):
    c = Caller(cuda_module, runtime)
    with pytest.raises(ValueError, match=r"'allocate_workspace' returned \d+ bytes, the call needs \d+"):
        c.forward(causal=True, allocate_workspace=c.allocator(shortfall=1))


def test_an_allocator_error_names_the_argument(cuda_module, runtime):
    def allocate(nbytes):
        raise MemoryError(f"CUDA out of memory ({nbytes} bytes)")

    with pytest.raises(MemoryError, match="'allocate_workspace'.*CUDA out of memory"):
        Caller(cuda_module, runtime).forward(causal=True, allocate_workspace=allocate)


@pytest.mark.parametrize("kernel", ["gmattn seg_state", "gmattn forward_chunk"])
def test_sync_check_names_the_kernel_that_faulted(cuda_module, runtime, monkeypatch, kernel):
    """A kernel fault surfaces at the caller's next synchronisation, with no name (here: the call
    returns); GMATTN_CUDA_SYNC=1 waits after each launch and names the faulting kernel."""
    runtime.set_fault_kernel(kernel)
    Caller(cuda_module, runtime).forward(causal=False)
    runtime.set_fault_kernel(kernel)  # drops the fault left pending
    monkeypatch.setenv("GMATTN_CUDA_SYNC", "1")
    with pytest.raises(RuntimeError, match=f"kernel '{kernel}' failed .*GMATTN_CUDA_SYNC=1"):
        Caller(cuda_module, runtime).forward(causal=False)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_a_forward_without_saving_keeps_nothing_per_token_and_component(cuda_module, runtime, causal, dtype):
    """Without gq, gk, den (no gradient needed) the chunk kernels compute each chunk's
    responsibilities themselves: the workspace stays the same from N = 256 to N = 2048 (the
    segment states are bounded by the GPU's size; before, it held Gq and Gk, 2 B H N K values),
    and out and the final state are the same bits as those of a forward that saves them."""
    runtime.set_device(8, 227 * 1024)
    sizes = {}
    for n in (256, 2048):
        c = Caller(cuda_module, runtime, n=n, dtype=dtype)
        fwd = c.forward(causal=causal, save=False, allocate_workspace=c.allocator())
        sizes[n] = c.workspace_requests[-1][0]
        saving = c.forward(causal=causal, save=True)
        for name in ("out", "S_final", "z_final"):
            np.testing.assert_array_equal(fwd[name], saving[name], err_msg=f"N={n} {name}")
    assert sizes[256] == sizes[2048], sizes


@pytest.mark.parametrize("causal", [False, True])
def test_packed_sequences(cuda_module, runtime, causal):
    """cu_seqlens through the CUDA module: the offsets are exported on the caller's stream like
    every array (never read on the host), the states have one row per sequence, and every output
    and gradient equals each sequence run alone (gmattn.reference.packed_gma), with the workspace
    from the caller's allocator."""
    lengths = [0, 37, 5, 64, 0, 1]
    offsets = np.cumsum([0] + lengths).astype(np.int64)
    S, n = len(lengths), int(offsets[-1])
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    p = dict(q=rand(1, n, H, D), k=rand(1, n, H, D), v=rand(1, n, H, DV), mu=rand(H, K, D),
             omega=rand(H, K, D) * 0.5, alpha=rand(H, K), S0=rand(S, H, K, DV).abs(), z0=rand(S, H, K).abs() + 0.5)
    cot = dict(dout=rand(1, n, H, DV), dS=rand(S, H, K, DV), dz=rand(S, H, K))
    c = Caller(cuda_module, runtime)

    def arg(name):
        return c.wrap(name, {**p, **cot}[name].numpy())

    fwd = dict(out=c.output("out", (1, n, H, DV)), S_final=c.output("S_final", (S, H, K, DV)),
               z_final=c.output("z_final", (S, H, K)), gq=c.output("gq", (1, H, n, K)),
               gk=c.output("gk", (1, H, n, K)), den=c.output("den", (1, H, n)))
    inputs = [arg(name) for name in ("q", "k", "v", "mu", "omega", "alpha")]
    cuda_module.forward(*inputs, None, arg("S0"), arg("z0"), *fwd.values(), causal=causal, eps=1e-6,
                        sigma_eps=1e-4, stream=0, allocate_workspace=c.allocator(),
                        cu_seqlens=c.wrap("cu_seqlens", offsets))
    assert ("cu_seqlens", 1, 0) in c.log
    fwd = {name: a.array for name, a in fwd.items()}
    grads = dict(dq=c.output("dq", (1, n, H, D)), dk=c.output("dk", (1, n, H, D)), dv=c.output("dv", (1, n, H, DV)),
                 dmu=c.output("dmu", (H, K, D)), domega=c.output("domega", (H, K, D)),
                 dalpha=c.output("dalpha", (H, K)), dS0=c.output("dS0", (S, H, K, DV)),
                 dz0=c.output("dz0", (S, H, K)))
    cuda_module.backward(*inputs, None, arg("S0"), arg("z0"),
                         *(c.wrap(name, fwd[name]) for name in ("out", "gq", "gk", "den")), arg("dout"), arg("dS"),
                         arg("dz"), *grads.values(), causal=causal, eps=1e-6, sigma_eps=1e-4, stream=0,
                         allocate_workspace=c.allocator(), cu_seqlens=c.wrap("cu_seqlens", offsets))
    grads = {name: a.array for name, a in grads.items()}

    x = {name: t.clone().requires_grad_(True) for name, t in p.items()}
    out, (S_f, z_f) = packed_gma(*(x[name] for name in ("q", "k", "v", "mu", "omega", "alpha")), offsets.tolist(),
                                 causal=causal, initial_state=(x["S0"], x["z0"]), output_final_state=True)
    loss = (out * cot["dout"]).sum() + (S_f * cot["dS"]).sum() + (z_f * cot["dz"]).sum()
    want = dict(out=out, S_final=S_f, z_final=z_f)
    want.update({"d" + name: gr for name, gr in zip(x, torch.autograd.grad(loss, list(x.values())))})
    for name, w in want.items():
        got = fwd[name] if name in fwd else grads[name]
        np.testing.assert_allclose(got, w.detach().numpy(), rtol=1e-9, atol=1e-11, err_msg=name)
