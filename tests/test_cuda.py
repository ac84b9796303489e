"""The CUDA module against the float64 reference. Skips cleanly without a GPU; the build and
import of the module are checked wherever it was built (CI compiles it with nvcc, no GPU)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import gmattn
from gmattn import reference

from conftest import make_problem

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


def _run(p, causal, device, seed=0):
    kw = dict(causal=causal, key_padding_mask=None if p.mask is None else p.mask.to(device),
              initial_state=p.state, output_final_state=True)
    out, (S, z) = gmattn.gma_attention(p.q, p.k, p.v, p.mu, p.omega, p.alpha, **kw)
    g = torch.Generator().manual_seed(seed)
    outs = [out, S, z]
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(loss, p.tensors())
    return [o.detach().cpu() for o in outs], [x.detach().cpu() for x in grads]


def _to(p, device, dtype=None, param_dtype=None):
    q = p.detached(dtype)
    for name in ("q", "k", "v", "mu", "omega", "alpha"):
        t = getattr(q, name).detach()
        if param_dtype is not None and name in ("mu", "omega", "alpha"):
            t = getattr(p, name).detach().to(param_dtype)
        setattr(q, name, t.to(device).requires_grad_())
    if q.state is not None:
        q.state = tuple(s.detach().to(device).requires_grad_() for s in q.state)
    return q


SHAPES = [(2, 37, 3, 5, 4, 6), (1, 1, 1, 1, 2, 3), (1, 300, 2, 16, 16, 16), (3, 65, 4, 64, 64, 64),
          (1, 1000, 2, 32, 64, 32)]


@needs_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}H{}K{}D{}Dv{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_float64_matches_reference(shape, causal):
    p = make_problem(*shape, mask=True, state=True, seed=sum(shape))
    with gmattn.testing.poisoned_outputs():
        outs, grads = _run(_to(p, "cuda"), causal, "cuda")
    ref_outs, ref_grads = _run(p.detached(), causal, "cpu")
    for a, b, name in zip(outs + grads, ref_outs + ref_grads, OUT_NAMES + GRAD_NAMES):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@needs_gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_float32_close_to_float64(causal):
    p = make_problem(2, 700, 4, 64, 64, 64, mask=True, state=True, seed=3)
    outs, grads = _run(_to(p, "cuda", torch.float32), causal, "cuda")
    ref_outs, ref_grads = _run(p.detached(), causal, "cpu")
    for a, b, name in zip(outs + grads, ref_outs + ref_grads, OUT_NAMES + GRAD_NAMES):
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err < 5e-5, f"{name}: relative error {err:.2e}"


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_low_precision_within_pytorch_error(dtype, causal):
    p = make_problem(2, 300, 4, 32, 32, 32, mask=True, seed=4)
    ref_outs, ref_grads = _run(p.detached(), causal, "cpu")
    torch_outs, torch_grads = reference_low(p, dtype, causal)
    outs, grads = _run(_to(p, "cuda", dtype, param_dtype=torch.float32), causal, "cuda")
    for a, t, r, name, factor in zip(outs + grads, torch_outs + torch_grads, ref_outs + ref_grads,
                                     OUT_NAMES + GRAD_NAMES, [2] * 3 + [3] * 8):
        ours = (a.double() - r).abs().max().item()
        theirs = (t.double() - r).abs().max().item()
        assert ours <= factor * theirs + 1e-5, f"{name}: {ours:.3e} vs plain PyTorch {theirs:.3e}"


def reference_low(p, dtype, causal):
    """Plain PyTorch (the naive reference) run in `dtype` on the GPU: the error budget."""
    low = _to(p, "cuda", dtype)
    kw = dict(causal=causal, key_padding_mask=low.mask.to("cuda"), output_final_state=True)
    out, (S, z) = reference.naive_gma(low.q, low.k, low.v, low.mu, low.omega, low.alpha, **kw)
    g = torch.Generator().manual_seed(0)
    outs = [out, S, z]
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(loss, low.tensors())
    return [o.detach().cpu() for o in outs], [x.detach().cpu() for x in grads]


@needs_gpu
def test_split_resume_on_gpu():
    p = _to(make_problem(2, 500, 2, 16, 16, 16, mask=True, seed=6), "cuda", torch.float64)
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
        first = _run(p, True, "cuda")
        second = _run(p, True, "cuda")
    stream.synchronize()
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)
    default = _run(p, True, "cuda")
    for a, b in zip(first[0] + first[1], default[0] + default[1]):
        assert torch.equal(a, b)


@needs_gpu
def test_torch_compile_on_gpu():
    torch._dynamo.reset()
    layer = gmattn.torch.GaussianMixtureAttention(64, 4, 16, causal=True).cuda()
    x = torch.randn(2, 300, 64, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
