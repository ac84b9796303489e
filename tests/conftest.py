"""Shared fixtures and input factories for the gmattn tests."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest

torch = pytest.importorskip("torch")


@dataclasses.dataclass
class Problem:
    q: "torch.Tensor"
    k: "torch.Tensor"
    v: "torch.Tensor"
    mu: "torch.Tensor"
    omega: "torch.Tensor"
    alpha: "torch.Tensor"
    mask: Optional["torch.Tensor"]
    state: Optional[tuple]

    def tensors(self):
        """Every differentiable input, in a fixed order."""
        extra = list(self.state) if self.state is not None else []
        return [self.q, self.k, self.v, self.mu, self.omega, self.alpha] + extra

    def detached(self, dtype=None, requires_grad=True) -> "Problem":
        def conv(t, is_param=False):
            if t is None:
                return None
            u = t.detach().clone()
            if dtype is not None and u.is_floating_point():
                u = u.to(dtype)
            return u.requires_grad_(requires_grad and u.is_floating_point())

        state = None if self.state is None else tuple(conv(s) for s in self.state)
        return Problem(conv(self.q), conv(self.k), conv(self.v), conv(self.mu), conv(self.omega), conv(self.alpha),
                       None if self.mask is None else self.mask.clone(), state)


def make_problem(B=2, N=37, H=3, K=5, D=4, Dv=6, *, mask=False, state=False, dtype=torch.float64, seed=0,
                 scale=1.0) -> Problem:
    """Random inputs; routing coordinates and means on the same scale so routing is non-trivial."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).requires_grad_()

    q, k = rand(B, N, H, D, s=scale), rand(B, N, H, D, s=scale)
    v = rand(B, N, H, Dv)
    mu = rand(H, K, D, s=scale)
    omega = rand(H, K, D, s=0.5)
    alpha = rand(H, K, s=0.5)
    m = None
    if mask:
        m = torch.rand(B, N, generator=g) > 0.3
        m[:, 0] = True
    st = None
    if state:
        S0 = (torch.rand(B, H, K, Dv, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        z0 = (torch.rand(B, H, K, generator=g, dtype=torch.float64) + 0.1).to(dtype).requires_grad_()
        st = (S0, z0)
    return Problem(q, k, v, mu, omega, alpha, m, st)


@pytest.fixture
def problem_factory():
    return make_problem


# With 16-bit inputs the final state is float32 (kernel and plain PyTorch alike): its error is a few
# float32 roundoffs of its scale (measured 2e-7), which 2x plain PyTorch's equally small error
# bounds only by luck. This floor, a fraction of its scale, is 5x above what is measured and ~1e-4
# of a 16-bit error.
LOW_PRECISION_STATE_FLOOR = 1e-6


def plain_mixed_precision(fn):
    """A gma_attention-like reference `fn` as plain PyTorch runs it on 16-bit q, k, v with float32
    parameters (a mixed-precision model): type promotion computes in float32, the output is
    rounded to the inputs' dtype, and the gradients of q, k, v come back rounded to it. Only the
    inputs and outputs are in low precision, as for the compiled kernels: the yardstick for them."""

    def call(q, k, v, mu, omega, alpha, *, output_final_state=False, **kwargs):
        res = fn(q.float(), k.float(), v.float(), mu, omega, alpha, output_final_state=output_final_state, **kwargs)
        if output_final_state:
            return res[0].to(q.dtype), res[1]
        return res.to(q.dtype)

    return call
