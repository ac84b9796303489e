"""PyTorch front end: the compiled kernels as torch.library custom ops.

`gmattn::forward` and `gmattn::backward` are custom ops with fake (meta) implementations and
an autograd formula, so the op works under torch.compile(fullgraph=True) without graph breaks
and passes torch.library.opcheck. CPU tensors go to `gmattn._core`, CUDA tensors to
`gmattn._cuda` (loaded on first use) on the caller's current stream.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _config, _ext
_checks.NATIVE_ARRAY_TYPES["torch"] = Tensor

_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
        torch.float64: torch.float64}


# A custom op returns tensors, never None: an output that was not requested is empty (size 0).
_NOT_REQUESTED = (0,)


# CPU outputs from this size up come from the core's buffer cache (gmattn.h acquire_scratch): a
# block released by an earlier step is reused instead of fresh memory, whose first write would
# page-fault every 4 KiB (glibc maps blocks over 32 MiB anew on every allocation). Smaller ones
# are cheap to allocate either way.
_CACHED_OUTPUT_BYTES = 1 << 20


def _empty(shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    numel = math.prod(shape)
    if like.is_cpu and not _config.poison_outputs:
        if numel * dtype.itemsize >= _CACHED_OUTPUT_BYTES:
            block = _ext.core().cpu_buffer(numel * dtype.itemsize)
            return torch.frombuffer(block, dtype=dtype, count=numel).view(shape)  # keeps `block` alive
        return torch.empty(shape, dtype=dtype)  # (a decoding step's outputs: no device object made)
    return _config.new_output(torch.empty, torch.full, shape, dtype=dtype, device=like.device)


def _forward_dtypes(q: Tensor):
    """dtypes of forward_op's outputs: out in the input dtype, the rest in the accumulator dtype."""
    return (q.dtype,) + (_ACC[q.dtype],) * 5


def _initial_state_shapes(q: Tensor, v: Tensor, mu: Tensor, has_state: bool, cu_seqlens: Optional[Tensor]):
    """Shapes of backward_op's dS0 and dz0, for the op and its fake alike; None without a state."""
    return _checks.state_shapes(q, v, mu, cu_seqlens) if has_state else (None, None)


def _sized(shape):
    return _NOT_REQUESTED if shape is None else shape


_NO_CONTEXT = contextlib.nullcontext()  # (reusable: nullcontext keeps no state)


def _backend(x: Tensor):
    """(compiled module, context that makes x's device current, (num_threads, stream,
    allocate_workspace) of the call) for the device of x. (The front end passes every argument of
    the module's functions by position: pybind11 matches keywords by name, string by string, which
    costs more than a short call's kernel.) CUDA: the kernels run on the caller's current stream of x's device (the
    module hands the stream to each tensor's __dlpack__, which torch accepts only on the current
    device), and their workspace comes from torch's caching allocator on that stream, so torch's
    memory statistics and limits see it."""
    if x.is_cpu:
        return _ext.core(), _NO_CONTEXT, (torch.get_num_threads(), 0, None)
    if x.device.type == "cuda":
        device = x.device

        def allocate_workspace(nbytes: int) -> Tensor:
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

        return _ext.cuda(), torch.cuda.device(device), (0, torch.cuda.current_stream(device).cuda_stream,
                                                        allocate_workspace)
    raise ValueError(f"gma_attention: tensors on device '{x.device}' are not supported (CPU and CUDA are)")


# torch's C-level export of a tensor as a DLPack capsule: about 0.5 us a tensor, where
# Tensor.__dlpack__ (Python-level checks) and the __dlpack_device__ query the compiled module
# makes cost about 4 us, 45 us for the dozen tensors of a call: more than the kernel of a short
# call. The CPU module takes such capsules directly; absent in some torch, the tensors are passed.
_to_dlpack = getattr(torch._C, "_to_dlpack", None)


def _plain(*tensors):
    """The tensors as the compiled module takes them: CPU tensors as DLPack capsules (the kernels
    only read inputs, or write freshly allocated outputs, so a capsule of a tensor that requires
    grad is fine), others as detached views (their __dlpack__ refuses tensors that require grad)."""
    return [None if t is None else _to_dlpack(t) if _to_dlpack is not None and t.is_cpu else t.detach()
            for t in tensors]


def _run_forward(q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, causal, eps, sigma_eps, return_state,
                 save_for_backward, cu_seqlens=None, unrequested=_NOT_REQUESTED):
    """The compiled forward on checked tensors: (out, S_final, z_final, gq, gk, den), unrequested
    ones empty (size 0), or None with `unrequested=None`. forward_op runs it; so does gma_attention
    directly for eager CPU calls that need no gradient (the custom op's dispatch costs more than a
    short call's kernel)."""
    shapes = _checks.forward_output_shapes(q, v, mu, return_state, save_for_backward, cu_seqlens)
    outputs = tuple(None if shape is None and unrequested is None else _empty(_sized(shape), q, dtype)
                    for shape, dtype in zip(shapes, _forward_dtypes(q)))
    module, on_device, (num_threads, stream, allocate_workspace) = _backend(q)
    with on_device:
        module.forward(
            *_plain(q, k, v, mu, omega, alpha, key_padding_mask, S0, z0),
            *_plain(*(None if shape is None else t for shape, t in zip(shapes, outputs))),  # the core skips None
            causal, eps, sigma_eps, num_threads, stream, allocate_workspace, *_plain(cu_seqlens),
        )
    return outputs


def _run_backward(dout, dS_final, dz_final, q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, out, gq, gk, den,
                  S_end, z_end, causal, eps, sigma_eps, cu_seqlens=None, unrequested=_NOT_REQUESTED):
    """The compiled backward on checked tensors: (dq, dk, dv, dmu, domega, dalpha, dS0, dz0), dS0 and
    dz0 empty (size 0) without S0, or None with `unrequested=None`. backward_op runs it; so does the
    direct autograd route."""
    acc = mu.dtype
    dq, dk = _empty(q.shape, q, q.dtype), _empty(k.shape, q, q.dtype)
    dv = _empty(v.shape, q, q.dtype)
    dmu, domega, dalpha = _empty(mu.shape, q, acc), _empty(omega.shape, q, acc), _empty(alpha.shape, q, acc)
    has_state = S0 is not None
    dS0 = dz0 = None
    if has_state or unrequested is not None:
        dS0, dz0 = (_empty(_sized(shape), q, acc) for shape in _initial_state_shapes(q, v, mu, has_state, cu_seqlens))
    module, on_device, (num_threads, stream, allocate_workspace) = _backend(q)
    with on_device:
        module.backward(
            *_plain(q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, out, gq, gk, den, dout, dS_final,
                    dz_final),
            *_plain(dq, dk, dv, dmu, domega, dalpha, dS0 if has_state else None, dz0 if has_state else None),
            causal, eps, sigma_eps, num_threads, stream, True, *_plain(S_end, z_end), allocate_workspace,
            *_plain(cu_seqlens),
        )  # (True: deterministic)
    return dq, dk, dv, dmu, domega, dalpha, dS0, dz0


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)
_functorch_level = torch._C._functorch.peek_interpreter_stack  # None: no torch.func transform active
_jit_tracing_state = torch._C._get_tracing_state  # None: torch.jit.trace is not recording


def _direct_call_allowed(*tensors) -> bool:
    """Whether gma_attention may call the core without the custom op: eager (not traced by
    torch.compile or torch.export), no torch function or dispatch mode active (it would expect to
    see the op), and plain CPU tensors: no tensor subclass (FakeTensor, DTensor, ...) and no lazy
    negation bit (x._neg_view(), `.imag` of a conjugate view) or efficient zero tensor, which
    DLPack does not carry and the op's dispatcher resolves first. No torch.func transform (vmap,
    grad, jvp) is active either: its wrapped tensors reach the kernels only through the op. Nor is
    torch.jit.trace recording: it records the op, and would record a direct call as constants."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0
            or torch._C._is_torch_function_mode_enabled() or _functorch_level() is not None
            or _jit_tracing_state() is not None):
        return False
    for t in tensors:  # (a loop, not all() over a generator: a decoding step makes this call)
        if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or not t.is_cpu or t.is_neg()
                              or t._is_zerotensor()):
            return False
    return True


@torch.library.custom_op("gmattn::forward", mutates_args=())
def forward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mu: Tensor,
    omega: Tensor,
    alpha: Tensor,
    key_padding_mask: Optional[Tensor],
    S0: Optional[Tensor],
    z0: Optional[Tensor],
    causal: bool,
    eps: float,
    sigma_eps: float,
    return_state: bool,
    save_for_backward: bool,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, S_final, z_final, gq, gk, den); unrequested ones are empty (size 0).
    cu_seqlens: packed sequences (int64 offsets on q's device)."""
    return _run_forward(q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, causal, eps, sigma_eps, return_state,
                        save_for_backward, cu_seqlens)


@forward_op.register_fake
def _forward_fake(q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, causal, eps, sigma_eps, return_state,
                  save_for_backward, cu_seqlens=None):
    shapes = _checks.forward_output_shapes(q, v, mu, return_state, save_for_backward, cu_seqlens)
    return tuple(q.new_empty(_sized(shape), dtype=dtype) for shape, dtype in zip(shapes, _forward_dtypes(q)))


@torch.library.custom_op("gmattn::backward", mutates_args=())
def backward_op(
    dout: Tensor,
    dS_final: Optional[Tensor],
    dz_final: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mu: Tensor,
    omega: Tensor,
    alpha: Tensor,
    key_padding_mask: Optional[Tensor],
    S0: Optional[Tensor],
    z0: Optional[Tensor],
    out: Tensor,
    gq: Tensor,
    gk: Tensor,
    den: Tensor,
    S_end: Optional[Tensor],
    z_end: Optional[Tensor],
    causal: bool,
    eps: float,
    sigma_eps: float,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dmu, domega, dalpha, dS0, dz0); dS0/dz0 are empty without S0.
    S_end, z_end (bidirectional, optional): the forward's final state, which the CPU core then does
    not sum again."""
    return _run_backward(dout, dS_final, dz_final, q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, out, gq, gk,
                         den, S_end, z_end, causal, eps, sigma_eps, cu_seqlens)


@backward_op.register_fake
def _backward_fake(dout, dS_final, dz_final, q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, out, gq, gk, den,
                   S_end, z_end, causal, eps, sigma_eps, cu_seqlens=None):
    dS0, dz0 = (mu.new_empty(_sized(shape)) for shape in _initial_state_shapes(q, v, mu, S0 is not None, cu_seqlens))
    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        torch.empty_like(mu), torch.empty_like(omega), torch.empty_like(alpha),
        dS0, dz0,
    )


def _setup_context(ctx, inputs, output):
    (q, k, v, mu, omega, alpha, mask, S0, z0, causal, eps, sigma_eps, return_state, save_for_backward,
     cu_seqlens) = inputs
    out, S_final, z_final, gq, gk, den = output
    # gma_attention asks the forward for the final state whenever the backward reuses it.
    reuse = return_state and _checks.backward_reuses_state(causal, save_for_backward, q, cu_seqlens)
    S_end, z_end = (S_final, z_final) if reuse else (None, None)
    ctx.save_for_backward(q, k, v, mu, omega, alpha, mask, S0, z0, out, gq, gk, den, S_end, z_end, cu_seqlens)
    ctx.causal, ctx.eps, ctx.sigma_eps, ctx.return_state = causal, eps, sigma_eps, return_state
    ctx.saved_responsibilities = save_for_backward
    # Gq, Gk and den are outputs only so backward can use them; without this autograd would hand
    # backward zero-filled (B, H, N, K) gradients for them (two O(N K) buffers at peak memory).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dS_final, dz_final, _dgq, _dgk, _dden):
    return _gradients(ctx, dout, dS_final, dz_final, backward_op)


def _gradients(ctx, dout, dS_final, dz_final, run_backward):
    """The gradients of forward_op's inputs, the backward kernels run by `run_backward` (backward_op,
    or _run_backward on the direct route)."""
    q, k, v, mu, omega, alpha, mask, S0, z0, out, gq, gk, den, S_end, z_end, cu_seqlens = ctx.saved_tensors
    if not ctx.saved_responsibilities:
        # The forward ran without saving (no input required grad when it was traced); recompute.
        reuse = _checks.backward_reuses_state(ctx.causal, True, q, cu_seqlens)
        out, S_end, z_end, gq, gk, den = forward_op(q, k, v, mu, omega, alpha, mask, S0, z0, ctx.causal, ctx.eps,
                                                    ctx.sigma_eps, reuse, True, cu_seqlens)
        if not reuse:
            S_end = z_end = None
    if not ctx.return_state:
        dS_final = dz_final = None
    if dout is None:  # only the final state was used
        dout = torch.zeros_like(out)
    dq, dk, dv, dmu, domega, dalpha, dS0, dz0 = run_backward(
        dout, dS_final, dz_final, q, k, v, mu, omega, alpha, mask, S0, z0, out, gq, gk, den, S_end, z_end,
        ctx.causal, ctx.eps, ctx.sigma_eps, cu_seqlens,
    )
    if S0 is None:
        dS0 = dz0 = None
    return dq, dk, dv, dmu, domega, dalpha, None, dS0, dz0, None, None, None, None, None, None


forward_op.register_autograd(_backward, setup_context=_setup_context)


class _DirectAutograd(torch.autograd.Function):
    """The eager CPU route of a call that needs gradients: the same kernels, saved tensors and
    backward as forward_op's autograd formula, without the custom op's dispatch (default filling,
    redispatch through the autograd and CPU keys, aliasing checks, twice: about 0.3 ms a training
    step of a short sequence, more than its kernels). torch.compile, export, dispatch and function
    modes and torch.func transforms take the op (see _direct_call_allowed). Inputs as forward_op's;
    returns (out, S_final, z_final), the state None unless requested."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _run_forward(*inputs, unrequested=None)  # (no empty state allocated when not asked for)
        _setup_context(ctx, inputs, output)
        return output[:3]

    @staticmethod
    @torch.autograd.function.once_differentiable  # (backward_op has no derivative either)
    def backward(ctx, dout, dS_final, dz_final):
        return _gradients(ctx, dout, dS_final, dz_final, _run_backward_direct)


def _run_backward_direct(*args):
    """_run_backward without the empty dS0, dz0 a custom op must return (None without a state)."""
    return _run_backward(*args, unrequested=None)


def _needs_grad(*tensors) -> bool:
    """Whether autograd records a call of these tensors (None: absent): grad mode on and one of
    them requiring grad. (A loop, not any() over a generator: a decoding step makes this call.)"""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _plain_call(q, k, v, mu, omega, alpha, initial_state, causal, output_final_state, eps, sigma_eps):
    """An eager CPU call without mask or packed sequences whose arguments plainly fit the kernels
    (_checks.plain_step_dims; plain CPU tensors, parameters and state in the accumulator dtype),
    without the Python checks: a short call's fixed cost. Without gradients, through the core's
    plain entry `step` (fewer arguments), which runs every check of its forward and, where one would
    fail, runs nothing and says so; with them, through _DirectAutograd, once the dtypes and state
    shapes the general path checks agree (its checks would pass). Returns gma_attention's result,
    or None, and then the general path runs, with its usual messages."""
    if initial_state is None:
        S0 = z0 = None
    elif type(initial_state) in (tuple, list) and len(initial_state) == 2:
        S0, z0 = initial_state
    else:
        return None
    if not _direct_call_allowed(q, k, v, mu, omega, alpha, S0, z0):
        return None
    acc = _ACC.get(q.dtype)
    if acc is None or mu.dtype is not acc:
        return None
    dims = _checks.plain_step_dims(q, k, v, mu, omega, alpha, causal, eps, sigma_eps)
    if dims is None:
        return None
    B, N, H, D, Dv, K = dims
    if _needs_grad(q, k, v, mu, omega, alpha, S0, z0):
        if (k.dtype is not q.dtype or v.dtype is not q.dtype or omega.dtype is not acc or alpha.dtype is not acc
                or S0 is not None and (S0.dtype is not acc or z0.dtype is not acc or S0.shape != (B, H, K, Dv)
                                       or z0.shape != (B, H, K))):
            return None
        return_state = output_final_state or _checks.backward_reuses_state(causal, True, q)
        out, S_final, z_final = _DirectAutograd.apply(q, k, v, mu, omega, alpha, None, S0, z0, causal, eps, sigma_eps,
                                                      return_state, True, None)
        return (out, (S_final, z_final)) if output_final_state else out
    out = _empty((B, N, H, Dv), q, q.dtype)
    S_final = z_final = None
    if output_final_state:
        S_final, z_final = _empty((B, H, K, Dv), q, acc), _empty((B, H, K), q, acc)
    if not _ext.core().step(*_plain(q, k, v, mu, omega, alpha, S0, z0, out, S_final, z_final), causal, eps, sigma_eps,
                            torch.get_num_threads()):
        return None
    return (out, (S_final, z_final)) if output_final_state else out


def _to_acc(t: Tensor, acc: torch.dtype, eager: bool) -> Tensor:
    """t in the accumulator dtype. An eager call skips the cast to the dtype t has (~3 us, a
    dozen a step); a traced one keeps it (Dynamo would guard on the dtype test: a recompile)."""
    return t if eager and t.dtype is acc else t.to(acc)


def gma_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mu: Tensor,
    omega: Tensor,
    alpha: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    initial_state: Optional[Tuple[Tensor, Tensor]] = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    sigma_eps: float = 1e-4,
    cu_seqlens: Optional[Tensor] = None,
):
    """Gaussian Mixture Attention on torch tensors (CPU or CUDA); see gmattn.gma_attention."""
    if key_padding_mask is None and cu_seqlens is None:
        result = _plain_call(q, k, v, mu, omega, alpha, initial_state, causal, output_final_state, eps, sigma_eps)
        if result is not None:
            return result
    _checks.check_arguments(q, k, v, mu, omega, alpha, key_padding_mask, initial_state, eps, sigma_eps, cu_seqlens)
    for name, t in _checks.array_arguments(k, v, mu, omega, alpha, key_padding_mask, initial_state, cu_seqlens):
        _checks.require_framework("gma_attention", f"'{name}'", t, "torch", "like q; convert with torch.as_tensor")
        if not (t.is_cpu and q.is_cpu) and t.device != q.device:  # (is_cpu: no device objects made)
            raise ValueError(f"gma_attention: '{name}' is on {t.device} but q is on {q.device}")
    acc = _ACC[q.dtype]
    # The core keeps parameters and state in the accumulator dtype; casting here keeps autograd
    # returning gradients in the caller's parameter dtype.
    eager = not torch.compiler.is_compiling()
    mu, omega, alpha = (_to_acc(t, acc, eager) for t in (mu, omega, alpha))
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = (_to_acc(s, acc, eager) for s in initial_state)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int64)  # the core reads int64 offsets
    needs_grad = _needs_grad(q, k, v, mu, omega, alpha, S0, z0)
    # An eager CPU call runs the core directly (without gradients) or through _DirectAutograd (with
    # them): the same computation as the custom op, which tests check bit for bit, without its
    # dispatch. The custom op serves tracing, modes and transforms.
    args = (q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, bool(causal), float(eps), float(sigma_eps),
            bool(output_final_state or _checks.backward_reuses_state(causal, needs_grad, q, cu_seqlens)),
            bool(needs_grad), cu_seqlens)
    if not _direct_call_allowed(q, k, v, mu, omega, alpha, key_padding_mask, S0, z0, cu_seqlens):
        out, S_final, z_final, _, _, _ = forward_op(*args)
    elif needs_grad:
        out, S_final, z_final = _DirectAutograd.apply(*args)
    else:
        out, S_final, z_final, _, _, _ = _run_forward(*args, unrequested=None)
    if output_final_state:
        return out, (S_final, z_final)
    return out
