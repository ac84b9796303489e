"""Bad input gets a clear error naming the argument and what was expected (docs/design.md section 2)."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
import torch

import gmattn
from gmattn import _ext

from conftest import make_problem


def args32(**over):
    p = make_problem(2, 10, 3, 4, 5, 6, dtype=torch.float32)
    a = dict(q=p.q.detach(), k=p.k.detach(), v=p.v.detach(), mu=p.mu.detach(), omega=p.omega.detach(),
             alpha=p.alpha.detach())
    a.update(over)
    return a


def call(a, **kw):
    return gmattn.gma_attention(a["q"], a["k"], a["v"], a["mu"], a["omega"], a["alpha"], **kw)


CASES = [
    ("q rank", dict(q=torch.zeros(2, 10, 5)), ValueError, r"'q' must have 4 dimensions \(B, N, H, D\)"),
    ("k shape", dict(k=torch.zeros(2, 10, 3, 4)), ValueError, r"'k' must have shape \(B, N, H, D\) = \(2, 10, 3, 5\)"),
    ("v batch", dict(v=torch.zeros(2, 9, 3, 6)), ValueError, r"'v' must have shape \(B, N, H, Dv\)"),
    ("mu heads", dict(mu=torch.zeros(2, 4, 5)), ValueError, r"'mu' must have shape \(H, K, D\) with H=3, D=5"),
    ("omega shape", dict(omega=torch.zeros(3, 4, 4)), ValueError, r"'omega' must have shape \(H, K, D\) = \(3, 4, 5\)"),
    ("omega K", dict(omega=torch.zeros(3, 5, 5)), ValueError, r"'omega' has K=5 components but mu and alpha have K=4"),
    ("alpha shape", dict(alpha=torch.zeros(3)), ValueError, r"'alpha' must have 2 dimensions \(H, K\)"),
    ("K = 0", dict(mu=torch.zeros(3, 0, 5), omega=torch.zeros(3, 0, 5), alpha=torch.zeros(3, 0)), ValueError,
     r"K \(components\) must be at least 1, got 0"),
    ("N = 0", dict(q=torch.zeros(2, 0, 3, 5), k=torch.zeros(2, 0, 3, 5), v=torch.zeros(2, 0, 3, 6)), ValueError,
     r"N \(sequence length\) must be at least 1, got 0"),
    ("integer q", dict(q=torch.zeros(2, 10, 3, 5, dtype=torch.int64)), TypeError,
     r"'q' must be a floating array .* got int64"),
    ("mixed k", dict(k=torch.zeros(2, 10, 3, 5, dtype=torch.float64)), TypeError,
     r"'k' must have the dtype of q \(float32\), got float64"),
    ("mixed params", dict(omega=torch.zeros(3, 4, 5, dtype=torch.float64)), TypeError,
     r"'omega' must have the dtype of mu \(float32\), got float64"),
    ("params vs inputs", dict(mu=torch.zeros(3, 4, 5, dtype=torch.float64), omega=torch.zeros(3, 4, 5, dtype=torch.float64),
                              alpha=torch.zeros(3, 4, dtype=torch.float64)), TypeError,
     r"mixture parameters \(mu, omega, alpha\) are float64 but q, k, v are float32"),
    ("param device", dict(mu=torch.zeros(3, 4, 5, device="meta")), ValueError, r"'mu' is on meta but q is on cpu"),
    ("not an array", dict(k=[[1.0]]), TypeError, r"'k' must be an array"),
]


@pytest.mark.parametrize("name,over,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_arguments_raise_clear_errors(name, over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(args32(**over))


def test_bad_mask_and_state():
    a = args32()
    with pytest.raises(ValueError, match=r"'key_padding_mask' must have shape \(B, N\) = \(2, 10\)"):
        call(a, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"'key_padding_mask' must be a bool array"):
        call(a, key_padding_mask=torch.ones(2, 10))
    with pytest.raises(TypeError, match=r"'initial_state' must be a pair \(S, z\)"):
        call(a, initial_state=torch.zeros(2, 3, 4, 6))
    with pytest.raises(ValueError, match=r"'initial_state\[0\] \(S\)' must have shape \(B, H, K, Dv\)"):
        call(a, initial_state=(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4)))
    with pytest.raises(ValueError, match=r"'initial_state\[1\] \(z\)' must have shape \(B, H, K\)"):
        call(a, initial_state=(torch.zeros(2, 3, 4, 6), torch.zeros(2, 3, 5)))
    with pytest.raises(ValueError, match=r"'eps' must be >= 0"):
        call(a, eps=-1.0)
    with pytest.raises(ValueError, match=r"'sigma_eps' must be > 0"):
        call(a, sigma_eps=0.0)


def test_unsupported_array_type():
    with pytest.raises(TypeError, match=r"'q' must be a torch.Tensor, an mlx.core.array or a numpy.ndarray"):
        gmattn.gma_attention([1.0], [1.0], [1.0], [1.0], [1.0], [1.0])


# The compiled module checks again (memory safety) whatever reaches it: outputs that are
# read-only, non-contiguous, of the wrong dtype or shape, or inputs of another dtype.
def _core_call(**over):
    p = make_problem(1, 8, 2, 3, 4, 5, dtype=torch.float32)
    d = dict(q=p.q.detach().numpy(), k=p.k.detach().numpy(), v=p.v.detach().numpy(), mu=p.mu.detach().numpy(),
             omega=p.omega.detach().numpy(), alpha=p.alpha.detach().numpy(), mask=None, S0=None, z0=None,
             out=np.empty((1, 8, 2, 5), np.float32), S_final=None, z_final=None, gq=None, gk=None, den=None)
    d.update(over)
    _ext.core().forward(**d, causal=True, eps=1e-6, sigma_eps=1e-4)
    return d


def test_core_rejects_unsafe_outputs():
    ro = np.empty((1, 8, 2, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="'out' is read-only"):
        _core_call(out=ro)
    with pytest.raises(ValueError, match="'out' must be C-contiguous"):
        _core_call(out=np.empty((1, 8, 5, 2), np.float32).transpose(0, 1, 3, 2))
    with pytest.raises(ValueError, match=r"'out' must be float32 \(inputs are float32\), got float64"):
        _core_call(out=np.empty((1, 8, 2, 5), np.float64))
    with pytest.raises(ValueError, match=r"'out' must have shape \(1, 8, 2, 5\), got \(1, 8, 2, 4\)"):
        _core_call(out=np.empty((1, 8, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"'mu' must be float32"):
        _core_call(mu=np.zeros((2, 3, 4), np.float64))
    with pytest.raises(ValueError, match=r"'key_padding_mask' must be bool"):
        _core_call(mask=np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="must give both S and z"):
        _core_call(S0=np.zeros((1, 2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="'k' must be an array that supports DLPack"):
        _core_call(k="not an array")
    # a valid call writes every element
    d = _core_call(out=np.full((1, 8, 2, 5), np.nan, np.float32))
    assert np.isfinite(d["out"]).all()


def test_missing_compiled_module_fails_loudly(monkeypatch):
    real = importlib.import_module

    def fake_import(name, *a, **kw):
        if name == "gmattn._cuda_missing_for_test":
            raise ImportError("No module named 'gmattn._cuda_missing_for_test'")
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match=re.escape("python -m pip install")):
        _ext._load("_cuda_missing_for_test", "test")

