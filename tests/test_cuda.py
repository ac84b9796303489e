"""The CUDA module against the float64 reference. Skips cleanly without a GPU; the build and
import of the module are checked wherever it was built (CI compiles it with nvcc, no GPU)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import gmattn
from gmattn import reference
from gmattn.testing import poisoned_outputs

from conftest import LOW_PRECISION_STATE_FLOOR, make_problem, plain_mixed_precision

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine")


def _cuda_module_built() -> bool:
    return importlib.util.find_spec("gmattn._cuda") is not None


def test_cuda_module_imports_where_built():
    """Where the build found nvcc, gmattn._cuda exists and imports without a GPU (static cudart)."""
    if not _cuda_module_built():
        if os.environ.get("GMATTN_REQUIRE_CUDA_MODULE") == "1":
            pytest.fail("GMATTN_REQUIRE_CUDA_MODULE=1 but gmattn._cuda was not built")
        pytest.skip("gmattn._cuda was not built (no nvcc at install time)")
    from gmattn import _ext

    mod = _ext.cuda()
    assert mod.device == "CUDA" and mod.__version__ == gmattn.__version__
    assert callable(mod.forward) and callable(mod.backward)


def test_cuda_module_rejects_cpu_tensors():
    if not _cuda_module_built():
        pytest.skip("gmattn._cuda was not built")
    from gmattn import _ext
    import numpy as np

    z = np.zeros((1, 2, 1, 2), np.float32)
    with pytest.raises(ValueError, match="must be on the CUDA device"):
        _ext.cuda().forward(z, z, z, np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), np.float32),
                            np.zeros((1, 2), np.float32), None, None, None, z.copy(), None, None, None, None, None,
                            causal=False, eps=1e-6, sigma_eps=1e-4)


OUT_NAMES = ["out", "S_final", "z_final"]
GRAD_NAMES = ["dq", "dk", "dv", "dmu", "domega", "dalpha", "dS0", "dz0"]


def _run(fn, p, causal, seed=0):
    """fn (gma_attention or a reference) on p's device; outputs and the gradients of a random
    linear loss, on the CPU."""
    device = p.q.device
    kw = dict(causal=causal, key_padding_mask=None if p.mask is None else p.mask.to(device),
              initial_state=p.state, output_final_state=True)
    out, (S, z) = fn(p.q, p.k, p.v, p.mu, p.omega, p.alpha, **kw)
    g = torch.Generator().manual_seed(seed)
    outs = [out, S, z]
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(loss, p.tensors())
    return [o.detach().cpu() for o in outs], [x.detach().cpu() for x in grads]


def _to(p, device, dtype=torch.float64, param_dtype=None):
    """p on `device`: q, k, v in `dtype`, parameters and state in `param_dtype` (default: dtype)."""
    param_dtype = dtype if param_dtype is None else param_dtype
    out = p.detached()
    for name in ("q", "k", "v", "mu", "omega", "alpha"):
        t = getattr(p, name).detach().to(dtype if name in ("q", "k", "v") else param_dtype)
        setattr(out, name, t.to(device).requires_grad_())
    if p.state is not None:
        out.state = tuple(s.detach().to(param_dtype).to(device).requires_grad_() for s in p.state)
    return out


def _reference(p_gpu, causal):
    """naive_gma in float64 on the CPU, on exactly the values the GPU was given."""
    return _run(reference.naive_gma, _to(p_gpu.detached(), "cpu"), causal)


SHAPES = [(2, 37, 3, 5, 4, 6), (1, 1, 1, 1, 2, 3), (1, 300, 2, 16, 16, 16), (3, 65, 4, 64, 64, 64),
          (1, 1000, 2, 32, 64, 32)]


@needs_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}H{}K{}D{}Dv{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_float64_matches_reference(shape, causal):
    p = _to(make_problem(*shape, mask=True, state=True, seed=sum(shape)), "cuda")
    with poisoned_outputs():
        outs, grads = _run(gmattn.gma_attention, p, causal)
    ref_outs, ref_grads = _reference(p, causal)
    for a, b, name in zip(outs + grads, ref_outs + ref_grads, OUT_NAMES + GRAD_NAMES):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@needs_gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_float32_close_to_float64(causal):
    p = _to(make_problem(2, 700, 4, 64, 64, 64, mask=True, state=True, seed=3), "cuda", torch.float32)
    outs, grads = _run(gmattn.gma_attention, p, causal)
    ref_outs, ref_grads = _reference(p, causal)
    for a, b, name in zip(outs + grads, ref_outs + ref_grads, OUT_NAMES + GRAD_NAMES):
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err < 5e-5, f"{name}: relative error {err:.2e}"


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_low_precision_within_pytorch_error(dtype, causal):
    """16-bit q, k, v with float32 parameters and state: within 2x (3x for gradients) of plain
    PyTorch's error given the same inputs on the GPU, against float64 on the same values (the
    yardstick and floor of tests/test_core.py)."""
    p = _to(make_problem(2, 300, 4, 32, 32, 32, mask=True, state=True, seed=4), "cuda", dtype, torch.float32)
    ref_outs, ref_grads = _reference(p, causal)
    torch_outs, torch_grads = _run(plain_mixed_precision(reference.naive_gma), p.detached(), causal)
    outs, grads = _run(gmattn.gma_attention, p.detached(), causal)
    low = ("out", "dq", "dk", "dv")
    for a, t, r, name, factor in zip(outs + grads, torch_outs + torch_grads, ref_outs + ref_grads,
                                     OUT_NAMES + GRAD_NAMES, [2] * 3 + [3] * 8):
        expected = dtype if name in low else torch.float32
        assert a.dtype == expected and t.dtype == expected, f"{name}: dtype {a.dtype}, expected {expected}"
        ours = (a.double() - r).abs().max().item()
        theirs = (t.double() - r).abs().max().item()
        floor = LOW_PRECISION_STATE_FLOOR * r.abs().max().item() if name in ("S_final", "z_final") else 0.0
        assert ours <= factor * theirs + floor, f"{name}: {ours:.3e} vs plain PyTorch {theirs:.3e}"


@needs_gpu
def test_split_resume_on_gpu():
    p = _to(make_problem(2, 500, 2, 16, 16, 16, mask=True, seed=6), "cuda")
    out, (S, z) = gmattn.gma_attention(p.q, p.k, p.v, p.mu, p.omega, p.alpha, causal=True,
                                       key_padding_mask=p.mask.cuda(), output_final_state=True)
    m = p.mask.cuda()
    o1, st = gmattn.gma_attention(p.q[:, :123], p.k[:, :123], p.v[:, :123], p.mu, p.omega, p.alpha, causal=True,
                                  key_padding_mask=m[:, :123], output_final_state=True)
    o2, st = gmattn.gma_attention(p.q[:, 123:], p.k[:, 123:], p.v[:, 123:], p.mu, p.omega, p.alpha, causal=True,
                                  key_padding_mask=m[:, 123:], initial_state=st, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(st[0], S, rtol=1e-10, atol=1e-12)


@needs_gpu
def test_runs_on_callers_stream_and_is_deterministic():
    p = _to(make_problem(4, 800, 4, 32, 32, 32, mask=True, seed=8), "cuda", torch.float32)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        first = _run(gmattn.gma_attention, p, True)
        second = _run(gmattn.gma_attention, p, True)
    stream.synchronize()
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)
    default = _run(gmattn.gma_attention, p, True)
    for a, b in zip(first[0] + first[1], default[0] + default[1]):
        assert torch.equal(a, b)


@needs_gpu
def test_torch_compile_on_gpu():
    torch._dynamo.reset()
    layer = gmattn.torch.GaussianMixtureAttention(64, 4, 16, causal=True).cuda()
    x = torch.randn(2, 300, 64, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
