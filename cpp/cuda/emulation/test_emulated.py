"""Checks the gmattn CUDA kernels against a float64 torch autograd reference of docs/design.md
section 1: run on the CPU by the emulator, or (--cuda) the real kernels on a GPU.

usage: python cpp/cuda/emulation/test_emulated.py [--cuda] [path/to/lib.so] [-k FILTER]
       python cpp/cuda/emulation/test_emulated.py [--cuda] [path/to/lib.so] --long N
       python cpp/cuda/emulation/test_emulated.py [--cuda] [path/to/lib.so] --numerics CASE
Build the library first with cpp/cuda/emulation/build.sh [--cuda]. Needs torch (CPU is enough
for the emulation; a CUDA build of torch for --cuda).
"""

import ctypes
import itertools
import math
import os
import sys
import time

import torch

from gmattn.reference import chunked_gma, naive_gma, responsibilities


class View(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("shape", ctypes.c_int64 * 4), ("stride", ctypes.c_int64 * 4)]


class Dims(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("B", "N", "H", "K", "D", "Dv")]


class Options(ctypes.Structure):
    _fields_ = [
        ("causal", ctypes.c_bool),
        ("eps", ctypes.c_double),
        ("sigma_eps", ctypes.c_double),
        ("num_threads", ctypes.c_int),
        ("stream", ctypes.c_void_p),
        ("deterministic", ctypes.c_bool),
        ("device", ctypes.c_int),  # -1: the current device
        ("workspace", ctypes.c_void_p),  # None: the core allocates its workspace
        ("workspace_bytes", ctypes.c_size_t),
    ]


# (in the order of the structs' fields in gmattn.h)
FWD_VIEWS = ["q", "k", "v", "mu", "omega", "alpha", "mask", "S0", "z0", "cu_seqlens", "out", "S_final", "z_final",
             "gq", "gk", "den"]
BWD_VIEWS = ["q", "k", "v", "mu", "omega", "alpha", "mask", "S0", "z0", "cu_seqlens", "out", "gq", "gk", "den",
             "S_end", "z_end", "dout", "dS_final", "dz_final", "dq", "dk", "dv", "dmu", "domega", "dalpha", "dS0", "dz0"]


class ForwardArgs(ctypes.Structure):
    _fields_ = [("dims", Dims), ("opt", Options), ("dtype", ctypes.c_int)] + [(n, View) for n in FWD_VIEWS]


class BackwardArgs(ctypes.Structure):
    _fields_ = [("dims", Dims), ("opt", Options), ("dtype", ctypes.c_int)] + [(n, View) for n in BWD_VIEWS]


DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def view_of(t, flip_dim=None):
    """A View of tensor t; with flip_dim, a negative-stride view of t.flip(flip_dim)."""
    v = View()
    if t is None:
        return v
    shape = list(t.shape) + [1] * (4 - t.dim())
    stride = list(t.stride()) + [0] * (4 - t.dim())
    ptr = t.data_ptr()
    if flip_dim is not None:
        ptr += (shape[flip_dim] - 1) * stride[flip_dim] * t.element_size()
        stride[flip_dim] = -stride[flip_dim]
    v.data = ptr
    for i in range(4):
        v.shape[i] = shape[i]
        v.stride[i] = stride[i]
    return v


def reference(q, k, v, mu, omega, alpha, mask, S0, z0, causal, eps, sigma_eps):
    """gmattn.reference.naive_gma, plus the tensors the kernels save for backward."""
    state = None if S0 is None else (S0, z0)
    out, (S_final, z_final) = naive_gma(q, k, v, mu, omega, alpha, causal=causal, key_padding_mask=mask,
                                        initial_state=state, output_final_state=True, eps=eps, sigma_eps=sigma_eps)
    Gq = responsibilities(q, mu, omega, alpha, sigma_eps).permute(0, 2, 1, 3)  # B H N K
    Gk = responsibilities(k, mu, omega, alpha, sigma_eps).permute(0, 2, 1, 3)
    if mask is not None:
        Gk = Gk * mask[:, None, :, None].to(Gk.dtype)
    z_read = Gk.cumsum(2) if causal else Gk.sum(2, keepdim=True)  # what each query's read sees
    if z0 is not None:
        z_read = z_read + z0[:, :, None, :]
    den = (Gq * z_read).sum(-1) + eps
    return out, S_final, z_final, Gq, Gk, den


def packed_reference(q, k, v, mu, omega, alpha, offsets, S0, z0, causal, eps, sigma_eps):
    """`reference` on each packed sequence alone (rows offsets[s]:offsets[s + 1] of q, k, v, the
    state row s), concatenated: the tensors of one row of B = 1 and the (S, H, ...) final states.
    An empty sequence's final state is its initial state (zeros without one)."""
    H, K, Dv = q.shape[2], mu.shape[1], v.shape[3]
    parts, finals = [], []
    for s, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        S0_s, z0_s = (None, None) if S0 is None else (S0[s:s + 1], z0[s:s + 1])
        if hi == lo:
            finals.append((q.new_zeros(1, H, K, Dv), q.new_zeros(1, H, K)) if S0 is None else (S0_s, z0_s))
            continue
        out, S_f, z_f, Gq, Gk, den = reference(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mu, omega, alpha, None, S0_s,
                                               z0_s, causal, eps, sigma_eps)
        parts.append((out, Gq, Gk, den))
        finals.append((S_f, z_f))
    out, Gq, Gk, den = (torch.cat([p[i] for p in parts], dim=1 if i == 0 else 2) for i in range(4))
    return out, torch.cat([f[0] for f in finals]), torch.cat([f[1] for f in finals]), Gq, Gk, den


def rel_err(got, want):
    got = got.detach().cpu().double()
    want = want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / max(scale, 1e-30)


def cpu_kernel_errors(ins, mask, S0, z0, dout, dS_final, dz_final, causal, eps, sigma_eps, want, grad_of):
    """The errors of the CPU kernels (gmattn.gma_attention) on the inputs of check_inputs, against
    its float64 reference values `want` (out, S_final, z_final) and gradients `grad_of`."""
    import gmattn

    leaves = {n: (t.detach().clone().requires_grad_(True) if t is not None else None)
              for n, t in dict(ins, S0=S0, z0=z0).items()}
    names = [n for n, t in leaves.items() if t is not None]
    state = None if S0 is None else (leaves["S0"], leaves["z0"])
    out, (S_final, z_final) = gmattn.gma_attention(
        *(leaves[n] for n in ("q", "k", "v", "mu", "omega", "alpha")), causal=causal,
        key_padding_mask=None if mask is None else mask.bool(), initial_state=state, output_final_state=True,
        eps=eps, sigma_eps=sigma_eps)
    loss = (out.double() * dout.double()).sum()
    if dS_final is not None:
        loss = loss + (S_final.double() * dS_final.double()).sum() + (z_final.double() * dz_final.double()).sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    errors = {n: rel_err(t, want[n]) for n, t in (("out", out), ("S_final", S_final), ("z_final", z_final))}
    errors.update({"d" + n: rel_err(g, grad_of[n]) for n, g in zip(names, grads)})
    return errors


TOL = {torch.float64: (1e-9, 1e-8), torch.float32: (3e-5, 3e-4), torch.float16: (4e-3, 2e-2),
       torch.bfloat16: (2e-2, 6e-2)}


USE_CUDA = False  # set by --cuda: kernel tensors on the GPU, reference on the CPU


def run_case(lib, dtype, causal, H, K, D, Dv, B=1, N=None, use_mask=False, use_init=False, use_dfinal=False,
             noncontig=False, negstride=False, deterministic=True, device=(8, 227 * 1024), seed=0,
             save=True, lengths=None, given_offsets=None):
    """One case on random inputs; with `lengths`, packed sequences of those lengths in one row
    (B = 1, N their sum, the states one row per sequence). given_offsets: what the kernels get as
    cu_seqlens instead of the lengths' offsets (offsets that break the rules, which the kernels
    must clamp to those of `lengths`)."""
    lib.gma_emu_set_device(device[0], device[1])
    offsets = None if lengths is None else [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    if offsets is not None:
        N = offsets[-1]
    seqs = B if offsets is None else len(lengths)
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    eps, sigma_eps = 1e-6, 1e-4

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=f64) * scale)

    # Inputs in the kernel dtype; the reference sees the same (rounded) values in float64.
    q = rnd(B, N, H, D, scale=0.7).to(dtype)
    k = rnd(B, N, H, D, scale=0.7).to(dtype)
    v = rnd(B, N, H, Dv).to(dtype)
    if noncontig:  # (B, N, H, D) views with permuted storage
        q = q.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
        v = v.transpose(0, 1).contiguous().transpose(0, 1)
    mu = rnd(H, K, D, scale=0.5).to(acc)
    omega = rnd(H, K, D, scale=0.5).to(acc)
    alpha = rnd(H, K, scale=0.5).to(acc)
    mask = None
    if use_mask:
        mask = (torch.rand(B, N, generator=g) > 0.3).to(torch.uint8)
        mask[0, : min(3, N)] = 0
    S0 = rnd(seqs, H, K, Dv).to(acc) if use_init else None
    z0 = (torch.rand(seqs, H, K, generator=g, dtype=f64) * 3).to(acc) if use_init else None
    dout = rnd(B, N, H, Dv).to(dtype)
    dS_final = rnd(seqs, H, K, Dv, scale=0.1).to(acc) if use_dfinal else None
    dz_final = rnd(seqs, H, K, scale=0.1).to(acc) if use_dfinal else None
    results, times = check_inputs(lib, dtype, causal, dict(q=q, k=k, v=v, mu=mu, omega=omega, alpha=alpha),
                                  mask, S0, z0, dout, dS_final, dz_final, negstride=negstride,
                                  deterministic=deterministic, save=save, eps=eps, sigma_eps=sigma_eps,
                                  offsets=offsets, kernel_offsets=given_offsets)
    return results, times, TOL[dtype]


def check_inputs(lib, dtype, causal, ins, mask, S0, z0, dout, dS_final=None, dz_final=None, negstride=False,
                 deterministic=True, save=True, eps=1e-6, sigma_eps=1e-4, cpu_errors=None, offsets=None,
                 kernel_offsets=None):
    """Runs the kernels' forward and backward on the inputs `ins` (q, k, v, mu, omega, alpha) and
    returns the relative errors (to the largest value) of every output and gradient against the
    float64 autograd reference, and the (forward, backward) seconds. With a dict `cpu_errors`, also
    fills it with the errors of the CPU kernels (gmattn.gma_attention) on the same inputs. With
    `offsets` (a list of S + 1 row offsets), the B = 1 row holds packed sequences (cu_seqlens), the
    states have S rows, and the reference runs on each sequence alone (packed_reference); the
    kernels get `kernel_offsets` instead when given."""
    q, k, v, mu, omega, alpha = (ins[n] for n in ("q", "k", "v", "mu", "omega", "alpha"))
    B, N, H, D = q.shape
    seqs = B if offsets is None else len(offsets) - 1
    K, Dv = mu.shape[1], v.shape[3]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    use_init, use_dfinal = S0 is not None, dS_final is not None

    # float64 reference with autograd
    leaves = {n: (t.double().clone().requires_grad_(True) if t is not None else None)
              for n, t in dict(q=q, k=k, v=v, mu=mu, omega=omega, alpha=alpha, S0=S0, z0=z0).items()}
    if offsets is None:
        out_r, Sf_r, zf_r, Gq_r, Gk_r, den_r = reference(
            leaves["q"], leaves["k"], leaves["v"], leaves["mu"], leaves["omega"], leaves["alpha"],
            mask, leaves["S0"], leaves["z0"], causal, eps, sigma_eps)
    else:
        out_r, Sf_r, zf_r, Gq_r, Gk_r, den_r = packed_reference(
            leaves["q"], leaves["k"], leaves["v"], leaves["mu"], leaves["omega"], leaves["alpha"], offsets,
            leaves["S0"], leaves["z0"], causal, eps, sigma_eps)
    loss = (out_r * dout.double()).sum()
    if use_dfinal:
        loss = loss + (Sf_r * dS_final.double()).sum() + (zf_r * dz_final.double()).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves.values() if t is not None])
    grad_of = dict(zip([n for n, t in leaves.items() if t is not None], grads))
    if cpu_errors is not None:
        cpu_errors.update(cpu_kernel_errors(ins, mask, S0, z0, dout, dS_final, dz_final, causal, eps, sigma_eps,
                                            dict(out=out_r, S_final=Sf_r, z_final=zf_r), grad_of))

    dev = "cuda" if USE_CUDA else "cpu"

    def nan(*shape, dt):
        return torch.full(shape, float("nan"), dtype=dt, device=dev)

    def on_dev(t):  # the kernel's copy of an input (strides preserved)
        return t.to(dev) if t is not None else None

    def call(fn, args):
        rc = fn(ctypes.byref(args), err, 512)
        if USE_CUDA:
            torch.cuda.synchronize()
        if rc != 0:
            raise RuntimeError(err.value.decode())

    stream = torch.cuda.current_stream().cuda_stream if USE_CUDA else None
    err = ctypes.create_string_buffer(512)

    out = nan(B, N, H, Dv, dt=dtype)
    S_final = nan(seqs, H, K, Dv, dt=acc)
    z_final = nan(seqs, H, K, dt=acc)
    gq = nan(B, H, N, K, dt=acc)
    gk = nan(B, H, N, K, dt=acc)
    den = nan(B, H, N, dt=acc)

    fa = ForwardArgs()
    fa.dims = Dims(B, N, H, K, D, Dv)
    fa.opt = Options(causal, eps, sigma_eps, 0, stream, deterministic, -1)
    fa.dtype = DTYPE_CODE[dtype]
    # negstride: pass k as a flipped view of k_store (so the kernel sees k)
    k_store = on_dev(k.flip(1).contiguous() if negstride else k)
    dq_, dv_, dmu_, domega_, dalpha_ = on_dev(q), on_dev(v), on_dev(mu), on_dev(omega), on_dev(alpha)
    dmask_, dS0_, dz0_ = on_dev(mask), on_dev(S0), on_dev(z0)
    fa.q, fa.v = view_of(dq_), view_of(dv_)
    fa.k = view_of(k_store, flip_dim=1 if negstride else None)
    fa.mu, fa.omega, fa.alpha = view_of(dmu_), view_of(domega_), view_of(dalpha_)
    fa.mask, fa.S0, fa.z0 = view_of(dmask_), view_of(dS0_), view_of(dz0_)
    given = offsets if kernel_offsets is None else kernel_offsets
    offsets_ = None if given is None else on_dev(torch.tensor(given, dtype=torch.int64))
    fa.cu_seqlens = view_of(offsets_)
    fa.out, fa.S_final, fa.z_final = view_of(out), view_of(S_final), view_of(z_final)
    if save:
        fa.gq, fa.gk, fa.den = view_of(gq), view_of(gk), view_of(den)
    t0 = time.time()
    call(lib.gma_emu_forward, fa)
    t_fwd = time.time() - t0

    results = {}
    results["out"] = rel_err(out, out_r)
    results["S_final"] = rel_err(S_final, Sf_r)
    results["z_final"] = rel_err(z_final, zf_r)
    if not save:
        return results, (t_fwd, 0.0)
    results["gq"] = rel_err(gq, Gq_r)
    results["gk"] = rel_err(gk, Gk_r)
    results["den"] = rel_err(den, den_r)

    dq = nan(B, N, H, D, dt=dtype)
    dk = nan(B, N, H, D, dt=dtype)
    dv = nan(B, N, H, Dv, dt=dtype)
    dmu = nan(H, K, D, dt=acc)
    domega = nan(H, K, D, dt=acc)
    dalpha = nan(H, K, dt=acc)
    dS0 = nan(seqs, H, K, Dv, dt=acc)
    dz0 = nan(seqs, H, K, dt=acc)
    ba = BackwardArgs()
    ba.dims = fa.dims
    ba.opt = fa.opt
    ba.dtype = fa.dtype
    for n in ["q", "k", "v", "mu", "omega", "alpha", "mask", "S0", "z0", "cu_seqlens"]:
        setattr(ba, n, getattr(fa, n))
    ba.out, ba.gq, ba.gk, ba.den = view_of(out), view_of(gq), view_of(gk), view_of(den)
    ddout_, ddSf_, ddzf_ = on_dev(dout), on_dev(dS_final), on_dev(dz_final)
    ba.dout = view_of(ddout_)
    ba.dS_final, ba.dz_final = view_of(ddSf_), view_of(ddzf_)
    ba.dq, ba.dk, ba.dv = view_of(dq), view_of(dk), view_of(dv)
    ba.dmu, ba.domega, ba.dalpha = view_of(dmu), view_of(domega), view_of(dalpha)
    ba.dS0, ba.dz0 = view_of(dS0), view_of(dz0)
    t0 = time.time()
    call(lib.gma_emu_backward, ba)
    t_bwd = time.time() - t0
    results["dq"] = rel_err(dq, grad_of["q"])
    results["dk"] = rel_err(dk, grad_of["k"])
    results["dv"] = rel_err(dv, grad_of["v"])
    results["dmu"] = rel_err(dmu, grad_of["mu"])
    results["domega"] = rel_err(domega, grad_of["omega"])
    results["dalpha"] = rel_err(dalpha, grad_of["alpha"])
    if use_init:
        results["dS0"] = rel_err(dS0, grad_of["S0"])
        results["dz0"] = rel_err(dz0, grad_of["z0"])
    return results, (t_fwd, t_bwd)


CASES = []
for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    for causal in (True, False):
        CASES.append(dict(dtype=dtype, causal=causal, B=2, N=77, H=2, K=5, D=7, Dv=9,
                          use_mask=True, use_init=True, use_dfinal=True))
# geometry and layout coverage (float64 to judge exactly, plus bf16 for the tensor-core path)
for dtype in (torch.float64, torch.bfloat16):
    for causal in (True, False):
        CASES += [
            dict(dtype=dtype, causal=causal, B=1, N=100, H=1, K=20, D=18, Dv=80),                 # 2 slices
            dict(dtype=dtype, causal=causal, B=4, N=40, H=4, K=16, D=16, Dv=16, use_init=True),  # P == 1
            dict(dtype=dtype, causal=causal, B=1, N=130, H=2, K=33, D=5, Dv=20, use_mask=True,
                 noncontig=True, negstride=True, use_dfinal=True),
            dict(dtype=dtype, causal=causal, B=2, N=50, H=1, K=12, D=4, Dv=24, use_init=True,
                 deterministic=False),
            dict(dtype=dtype, causal=causal, B=1, N=64, H=1, K=40, D=8, Dv=70, use_init=True,
                 use_dfinal=True, device=(1, 60 * 1024)),  # small smem: C = 16, narrower slices
        ]
CASES.append(dict(dtype=torch.float32, causal=True, B=1, N=40, H=2, K=8, D=8, Dv=8, save=False))
CASES.append(dict(dtype=torch.float64, causal=True, B=1, N=20, H=1, K=256, D=3, Dv=4, use_init=True))
CASES.append(dict(dtype=torch.float64, causal=False, B=1, N=300, H=1, K=100, D=40, Dv=8, use_mask=True))
CASES.append(dict(dtype=torch.float32, causal=True, B=1, N=90, H=1, K=250, D=37, Dv=8, use_init=True,
                  device=(2, 100 * 1024)))  # shared memory fallbacks of every kernel
# Packed sequences (cu_seqlens), against each sequence run alone. On the default emulated GPU (8
# SMs) a segment is about N / 16 rows, so a long sequence spans several segments (its states go
# through the scan) while a short one is a single segment (causal: it streams its state); on a
# one-SM GPU a segment is about N / 2 rows. Lengths include empty sequences and lengths that are
# not multiples of the chunk.
PACKED_LENGTHS = {
    "mixed": [0, 37, 0, 5, 64, 1, 100, 0, 33],
    "one long": [3, 250, 7],
    "many short": [1 + (7 * i) % 9 for i in range(40)],
    "empty first and last": [0, 0, 20, 0],
}
for dtype in (torch.float64, torch.float32):
    for causal in (True, False):
        for name, lengths in PACKED_LENGTHS.items():
            CASES.append(dict(dtype=dtype, causal=causal, lengths=lengths, H=2, K=5, D=7, Dv=9, use_init=True,
                              use_dfinal=True))
        CASES += [
            dict(dtype=dtype, causal=causal, lengths=[70, 0, 130, 9], H=1, K=6, D=4, Dv=5, use_init=True,
                 use_dfinal=True, device=(1, 227 * 1024)),  # segments of about N / 2: mostly one each
            dict(dtype=dtype, causal=causal, lengths=[17, 45, 2], H=1, K=20, D=6, Dv=80,
                 use_dfinal=True),  # two value slices, no initial state
            dict(dtype=dtype, causal=causal, lengths=[40, 0, 23], H=2, K=40, D=8, Dv=70, use_init=True,
                 use_dfinal=True, device=(1, 60 * 1024)),  # small shared memory: C = 16
            dict(dtype=dtype, causal=causal, lengths=[31, 90], H=1, K=8, D=5, Dv=6, use_init=True,
                 deterministic=False),
        ]
for causal in (True, False):  # the tensor-core path
    CASES.append(dict(dtype=torch.bfloat16, causal=causal, lengths=[0, 37, 5, 100, 1], H=2, K=5, D=7, Dv=9,
                      use_init=True, use_dfinal=True))
CASES.append(dict(dtype=torch.float32, causal=True, lengths=[5, 0, 60, 12], H=2, K=8, D=8, Dv=8, save=False))
for causal in (True, False):  # offsets outside [0, N] or decreasing: clamped, never outside the tensors
    CASES.append(dict(dtype=torch.float64, causal=causal, lengths=[30, 0, 20, 0], given_offsets=[-5, 30, 20, 1000, 50],
                      H=2, K=5, D=7, Dv=9, use_init=True, use_dfinal=True))


# Invalid arguments: the entry points' own checks must reject them (invalid_argument) before any
# workspace or launch; views are stride-0 views of one small buffer, so nothing reads or writes
# out of bounds even if a check let a case through. Not for --cuda (no device buffer here).
FWD_SHAPES = dict(q="BNHD", k="BNHD", v="BNHV", mu="HKD", omega="HKD", alpha="HK", out="BNHV", S_final="BHKV",
                  z_final="BHK", gq="BHNK", gk="BHNK", den="BHN")
BWD_SHAPES = dict(q="BNHD", k="BNHD", v="BNHV", mu="HKD", omega="HKD", alpha="HK", out="BNHV", gq="BHNK",
                  gk="BHNK", den="BHN", dout="BNHV", dq="BNHD", dk="BNHD", dv="BNHV", dmu="HKD", domega="HKD",
                  dalpha="HK", dS0="BHKV", dz0="BHK")
ERROR_CASES = [  # (name, dims changes, view changes, expected part of the message)
    ("K=0", dict(K=0), {}, "must be positive"),
    ("K=257", dict(K=257), {}, "K = 257 exceeds"),
    ("D=1025", dict(D=1025), {}, "D = 1025 exceeds"),
    ("Dv=1025", dict(Dv=1025), {}, "Dv = 1025 exceeds"),
    ("no q", {}, dict(q=None), "q is required"),
    ("v shape", {}, dict(v=(3, 4)), "v: dimension 3 is 4, expected 3"),
    ("N=2^31", dict(N=2**31), {}, "too large"),
    ("B*H=2^64", dict(B=2**62, H=4), {}, "too large"),  # B*H wraps to 0 in int64
    ("B*N*H*K=2^69", dict(B=2**30, N=2**31 - 1, H=1, K=256), {}, "too large"),  # workspace sizes overflow
    # valid N = 2^31 - 1 on a GPU too small for any chunk: the geometry search must say so without
    # overflowing int when it rounds N up to 16 (UBSan)
    ("N=2^31-1,small GPU", dict(N=2**31 - 1, B=1, H=1, device=(8, 1024)), {}, "needs more shared memory"),
    # packed sequences (cu_seqlens: S + 1 offsets; only the shapes are checked, the values stay on the GPU)
    ("packed,B=2", {}, dict(cu_seqlens=(3,)), "with cu_seqlens (packed sequences) B must be 1, got 2"),
    ("packed,no sequence", dict(B=1), dict(cu_seqlens=(1,)), "1 <= S < 2^30 sequences, got 1 offsets"),
    ("packed,mask", dict(B=1), dict(cu_seqlens=(3,), mask=(1, 3)), "cu_seqlens and mask cannot be combined"),
    ("packed,states per row", dict(B=1), dict(cu_seqlens=(3,)), "dimension 0 is 1, expected 2"),  # S_final, dS0
]


def run_error_case(lib, backward, dims_change, view_change, expect):
    buf = torch.zeros(64, dtype=torch.float64)
    d = dict(B=2, N=3, H=2, K=4, D=5, Dv=3, device=(8, 227 * 1024))
    d.update(dims_change)
    lib.gma_emu_set_device(*d["device"])
    args = BackwardArgs() if backward else ForwardArgs()
    args.dims = Dims(*(d[n] for n in ("B", "N", "H", "K", "D", "Dv")))
    args.opt = Options(True, 1e-6, 1e-4, 0, None, True, -1)
    args.dtype = DTYPE_CODE[torch.float64]
    letters = dict(B="B", N="N", H="H", K="K", D="D", V="Dv")
    shapes = BWD_SHAPES if backward else FWD_SHAPES
    for name, shape in view_change.items():  # optional arguments the tables leave absent: their shape
        if name not in shapes:
            v = View()
            v.data = buf.data_ptr()
            for i, size in enumerate(shape):
                v.shape[i] = size
            setattr(args, name, v)
    for name, shape in shapes.items():
        v = View()
        v.data = buf.data_ptr()
        for i, c in enumerate(shape):
            v.shape[i] = d[letters[c]]
        if name in view_change:
            change = view_change[name]
            if change is None:  # absent
                v = View()
            else:  # (dimension, wrong size)
                v.shape[change[0]] = change[1]
        setattr(args, name, v)
    err = ctypes.create_string_buffer(512)
    rc = (lib.gma_emu_backward if backward else lib.gma_emu_forward)(ctypes.byref(args), err, 512)
    msg = err.value.decode()
    return rc == 1 and msg.startswith("invalid_argument") and expect in msg, f"rc={rc} {msg!r}"


# Where float32 is fragile, the CUDA kernels must be as accurate as the CPU kernels, both judged by
# the float64 reference on the same float32 inputs (docs/design.md section 4). Each case maps to
# its inputs (q, k, v, mu, omega, alpha as float64).
def tiny_variances_problem():
    """Peaked routing with sigma^2 at sigma_eps (1e-4) for half the components, D = 64: the points
    sit near the means, so a responsibility rounds to 1. The plain softmax backward then loses the
    gradients of alpha, omega and mu (its 1 - gamma_a is rounding noise); sum_d log sigma^2 ~ -590
    must be formed in double."""
    g = torch.Generator().manual_seed(1)
    B, N, H, K, D, Dv = 1, 96, 1, 8, 64, 8

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mu = randn(H, K, D)
    omega = torch.full((H, K, D), -40.0, dtype=torch.float64)  # softplus(-40) ~ 4e-18: sigma2 = sigma_eps
    omega[:, 1::2] = 0.5 + randn(H, K // 2, D).abs()
    pick = torch.randint(0, K, (B, N, H), generator=g)
    q = mu[0][pick] + 0.01 * randn(B, N, H, D)
    k = mu[0][pick.flip(1)] + 0.01 * randn(B, N, H, D)
    return dict(q=q, k=k, v=randn(B, N, H, Dv), mu=mu, omega=omega, alpha=0.5 * randn(H, K))


def far_points_problems():
    """Points far from the origin with tiny variances (the CPU accuracy tests' problems: clustered
    near one centre 100 away, or spread over +-100 with contested tight components), and points far
    from every mean (|x - mu| ~ 50, D = 64): the responsibilities must stay finite, sum to 1 and
    be as accurate as the CPU's."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests"))
    from test_cpu_accuracy import _far_tight_problem

    names = ("q", "k", "v", "mu", "omega", "alpha")
    problems = {layout: dict(zip(names, _far_tight_problem(layout))) for layout in ("clustered", "spread")}
    g = torch.Generator().manual_seed(2)
    B, N, H, K, D, Dv = 1, 96, 1, 8, 64, 8

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    problems["far from every mean"] = dict(q=50 + randn(B, N, H, D), k=-50 + randn(B, N, H, D), v=randn(B, N, H, Dv),
                                           mu=randn(H, K, D), omega=0.5 * randn(H, K, D), alpha=0.5 * randn(H, K))
    return problems


def numerics_errors(lib, ins, causal=True):
    """float32 errors of the CUDA kernels and of the CPU kernels on the inputs `ins`. The CPU
    kernels do not expose their responsibilities: for gq and gk the second dict holds the errors of
    plain PyTorch in float32 (gmattn.reference.responsibilities) instead."""
    lib.gma_emu_set_device(8, 227 * 1024)
    f32 = torch.float32
    ins = {n: t.to(f32) for n, t in ins.items()}
    B, N, H, _ = ins["q"].shape
    dout = torch.randn(B, N, H, ins["v"].shape[3], generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64).to(f32)
    cpu = {}
    cuda, _ = check_inputs(lib, f32, causal, ins, None, None, None, dout, cpu_errors=cpu)
    for x, key in (("q", "gq"), ("k", "gk")):
        want, plain = (responsibilities(ins[x].to(dt), *(ins[n].to(dt) for n in ("mu", "omega", "alpha")), 1e-4)
                       for dt in (torch.float64, f32))
        cpu[key] = rel_err(plain, want)
    return cuda, cpu


def numerics_case(lib, case):
    """Checks one case of --numerics; returns the lines to print and whether it passed. Bound:
    each error at most max(3x the CPU's, 1e-6) (the CPU kernels' float32 tests allow 2-3x plain
    PyTorch's error; for gq and gk: 3x plain PyTorch's), den within 1e-6."""
    problems = {"tiny-variances": {"tiny variances": tiny_variances_problem()}, "far-points": far_points_problems()}
    lines, ok = [], True
    for name, ins in problems[case].items():
        cuda, cpu = numerics_errors(lib, ins)
        for key, err in cuda.items():
            bound = max(3 * cpu[key], 1e-6) if key in cpu else 1e-6
            good = err <= bound
            ok &= good
            lines.append(f"{'ok  ' if good else 'FAIL'} {name}: {key} cuda {err:.2e}"
                         + (f"  {'plain' if key in ('gq', 'gk') else 'cpu'} {cpu[key]:.2e}" if key in cpu else "")
                         + f"  bound {bound:.1e}")
    return lines, ok


def long_sequence_errors(lib, N, sm_count=1):
    """Causal float32 forward over N tokens for one (batch, head) pair on a GPU of `sm_count` SMs
    (few segments: each block carries the state over N / 2 sm_count tokens). Values have a
    non-zero mean, so every chunk adds terms of one sign to the state: the worst case for float32
    running sums. Returns relative errors (to the largest value) of the last 1000 outputs, the
    final S and z against float64 (gmattn.reference.chunked_gma)."""
    lib.gma_emu_set_device(sm_count, 227 * 1024)
    B, H, K, D, Dv = 1, 1, 8, 8, 16
    g = torch.Generator().manual_seed(0)
    f64, f32 = torch.float64, torch.float32
    q, k = torch.randn(B, N, H, D, generator=g, dtype=f64), torch.randn(B, N, H, D, generator=g, dtype=f64)
    v = torch.randn(B, N, H, Dv, generator=g, dtype=f64) + 1.0
    mu, omega = torch.randn(H, K, D, generator=g, dtype=f64), 0.5 * torch.randn(H, K, D, generator=g, dtype=f64)
    alpha = 0.5 * torch.randn(H, K, generator=g, dtype=f64)
    ins = [t.to(f32) for t in (q, k, v, mu, omega, alpha)]
    want, (S_want, z_want) = chunked_gma(*(t.double() for t in ins), causal=True, output_final_state=True)
    dev = "cuda" if USE_CUDA else "cpu"
    ins = [t.to(dev) for t in ins]
    out = torch.full((B, N, H, Dv), float("nan"), device=dev)
    S, z = torch.full((B, H, K, Dv), float("nan"), device=dev), torch.full((B, H, K), float("nan"), device=dev)
    fa = ForwardArgs()
    fa.dims = Dims(B, N, H, K, D, Dv)
    stream = torch.cuda.current_stream().cuda_stream if USE_CUDA else None
    fa.opt = Options(True, 1e-6, 1e-4, 0, stream, True, -1)
    fa.dtype = DTYPE_CODE[f32]
    fa.q, fa.k, fa.v, fa.mu, fa.omega, fa.alpha = (view_of(t) for t in ins)
    fa.mask, fa.S0, fa.z0 = view_of(None), view_of(None), view_of(None)
    fa.out, fa.S_final, fa.z_final = view_of(out), view_of(S), view_of(z)
    err = ctypes.create_string_buffer(512)
    if lib.gma_emu_forward(ctypes.byref(fa), err, 512) != 0:
        raise RuntimeError(err.value.decode())
    if USE_CUDA:
        torch.cuda.synchronize()
    return {"out (last 1000)": rel_err(out[:, -1000:], want[:, -1000:]), "S_final": rel_err(S, S_want),
            "z_final": rel_err(z, z_want)}


def main():
    global USE_CUDA
    args = sys.argv[1:]
    flt = None
    if "--cuda" in args:
        args.remove("--cuda")
        USE_CUDA = True
    if "-k" in args:
        i = args.index("-k")
        flt = args[i + 1]
        del args[i:i + 2]
    long_n = None
    numerics = None
    if "--numerics" in args:
        i = args.index("--numerics")
        numerics = args[i + 1]
        del args[i:i + 2]
    if "--long" in args:
        i = args.index("--long")
        long_n = int(args[i + 1])
        del args[i:i + 2]
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(here, "..", "..", "..", "build", "cuda" if USE_CUDA else "emulated",
                           "libgmattn_cuda_test.so" if USE_CUDA else "libgmattn_cuda_emulated.so")
    lib = ctypes.CDLL(args[0] if args else default)
    lib.gma_emu_sizeof_forward_args.restype = ctypes.c_size_t
    lib.gma_emu_sizeof_backward_args.restype = ctypes.c_size_t
    assert lib.gma_emu_sizeof_forward_args() == ctypes.sizeof(ForwardArgs)
    assert lib.gma_emu_sizeof_backward_args() == ctypes.sizeof(BackwardArgs)
    if long_n is not None:  # float32 state sums over a long sequence: the CPU kernels' bounds
        errors = long_sequence_errors(lib, long_n)
        print(f"long sequence N={long_n}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        sys.exit(0 if errors["out (last 1000)"] < 2e-6 and max(errors["S_final"], errors["z_final"]) < 2e-7 else 1)
    if numerics is not None:
        lines, ok = numerics_case(lib, numerics)
        print("\n".join(lines))
        sys.exit(0 if ok else 1)
    passed = failed = 0
    for case in CASES:
        name = ",".join(f"{k}={str(v).replace('torch.', '')}" for k, v in case.items())
        if flt and flt not in name:
            continue
        res, (tf_, tb_), (tol_f, tol_b) = run_case(lib, **case)
        bad = {k: v for k, v in res.items() if not v <= (tol_b if k.startswith("d") and k != "den" else tol_f)}
        worst = max(res.items(), key=lambda kv: kv[1])
        status = "ok  " if not bad else "FAIL"
        print(f"{status} {name}  worst {worst[0]}={worst[1]:.2e}  ({tf_:.1f}s + {tb_:.1f}s)"
              + (f"  bad: {', '.join(f'{k}={v:.2e}' for k, v in bad.items())}" if bad else ""), flush=True)
        passed += not bad
        failed += bool(bad)
    for (case_name, dims_change, view_change, expect), backward in itertools.product(ERROR_CASES, (False, True)):
        name = f"error:{'backward' if backward else 'forward'}:{case_name}"
        if USE_CUDA or (flt and flt not in name):
            continue
        good, got = run_error_case(lib, backward, dims_change, view_change, expect)
        print(f"{'ok  ' if good else 'FAIL'} {name}  {got}", flush=True)
        passed += good
        failed += not good
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
