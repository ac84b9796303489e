"""Tests of the pure-PyTorch references in gmattn.reference (no compiled extension needed)."""

import pytest
import torch

from gmattn.reference import chunked_gma, naive_gma, responsibilities

F64 = torch.float64


def make_inputs(B=2, N=7, H=2, D=3, Dv=4, K=5, dtype=F64, seed=0, state=False, mask=False,
                requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)

    t = dict(
        q=r(B, N, H, D), k=r(B, N, H, D), v=r(B, N, H, Dv),
        mu=r(H, K, D), omega=r(H, K, D, scale=0.5), alpha=r(H, K),
    )
    if state:
        t["S0"] = torch.rand(B, H, K, Dv, generator=g, dtype=F64).to(dtype)
        t["z0"] = torch.rand(B, H, K, generator=g, dtype=F64).to(dtype) + 0.1
    if requires_grad:
        for x in t.values():
            x.requires_grad_(True)
    m = None
    if mask:
        m = torch.rand(B, N, generator=g) > 0.35
        m[:, 0] = True  # keep at least one real key per row
    return t, m


def call(fn, t, m, causal, final=True, **kw):
    st = (t["S0"], t["z0"]) if "S0" in t else None
    return fn(t["q"], t["k"], t["v"], t["mu"], t["omega"], t["alpha"], causal=causal,
              key_padding_mask=m, initial_state=st, output_final_state=final, **kw)


# ---------------------------------------------------------------------------------------
# an independent, loop-based implementation (per-token recurrence)
# ---------------------------------------------------------------------------------------

def loop_gma(q, k, v, mu, omega, alpha, causal, mask=None, S0=None, z0=None, eps=1e-6,
             sigma_eps=1e-4):
    B, N, H, D = q.shape
    Dv, K = v.shape[-1], mu.shape[1]
    sd = torch.sqrt(torch.nn.functional.softplus(omega) + sigma_eps)
    out = torch.zeros(B, N, H, Dv, dtype=q.dtype)

    def gamma(x, h):  # x (D,) -> (K,), via torch.distributions (independent of the module)
        lp = torch.distributions.Normal(mu[h], sd[h]).log_prob(x).sum(-1)
        return torch.softmax(torch.log_softmax(alpha[h], -1) + lp, -1)

    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, Dv, dtype=q.dtype) if S0 is None else S0[b, h].clone()
            z = torch.zeros(K, dtype=q.dtype) if z0 is None else z0[b, h].clone()
            if not causal:  # every query sees all keys
                for j in range(N):
                    if mask is None or mask[b, j]:
                        gk = gamma(k[b, j, h], h)
                        S = S + torch.outer(gk, v[b, j, h])
                        z = z + gk
            for i in range(N):
                if causal and (mask is None or mask[b, i]):
                    gk = gamma(k[b, i, h], h)
                    S = S + torch.outer(gk, v[b, i, h])
                    z = z + gk
                gq = gamma(q[b, i, h], h)
                out[b, i, h] = (gq @ S) / (gq @ z + eps)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask,with_state", [(False, False), (True, True), (True, False)])
def test_naive_matches_loop(causal, with_mask, with_state):
    t, m = make_inputs(B=2, N=6, H=2, D=3, Dv=2, K=3, state=with_state, mask=with_mask, seed=1)
    out = call(naive_gma, t, m, causal, final=False)
    ref = loop_gma(t["q"], t["k"], t["v"], t["mu"], t["omega"], t["alpha"], causal, m,
                   t.get("S0"), t.get("z0"))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# responsibilities
# ---------------------------------------------------------------------------------------

def test_responsibilities_simplex_and_density():
    t, _ = make_inputs(B=2, N=9, H=3, D=4, K=6)
    g = responsibilities(t["q"], t["mu"], t["omega"], t["alpha"])
    assert g.shape == (2, 9, 3, 6) and g.dtype == F64
    assert (g >= 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 9, 3, dtype=F64), rtol=0, atol=1e-13)
    # equals the posterior of a diagonal Gaussian mixture (torch.distributions)
    sd = torch.sqrt(torch.nn.functional.softplus(t["omega"]) + 1e-4)
    lp = torch.distributions.Normal(t["mu"], sd).log_prob(t["q"].unsqueeze(-2)).sum(-1)
    ref = torch.softmax(torch.log_softmax(t["alpha"], -1) + lp, -1)
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-13)


def test_responsibilities_single_component_is_one():
    t, _ = make_inputs(B=1, N=5, H=2, D=3, K=1)
    g = responsibilities(t["q"] * 100, t["mu"], t["omega"], t["alpha"])
    assert torch.equal(g, torch.ones(1, 5, 2, 1, dtype=F64))


def test_responsibilities_sigma_eps_floor():
    # very negative omega: sigma2 -> sigma_eps, the argmax is the nearest mean (scaled)
    t, _ = make_inputs(B=1, N=4, H=1, D=2, K=3)
    g = responsibilities(t["q"], t["mu"], torch.full_like(t["omega"], -50.0),
                         torch.zeros_like(t["alpha"]), sigma_eps=1e-2)
    d2 = ((t["q"].unsqueeze(-2) - t["mu"]) ** 2).sum(-1)
    assert torch.equal(g.argmax(-1), d2.argmin(-1))
    assert torch.isfinite(g).all()


# ---------------------------------------------------------------------------------------
# naive vs chunked (float64): outputs, final state, all gradients
# ---------------------------------------------------------------------------------------

SHAPES = [
    # B, N, H, D, Dv, K, chunk_size
    dict(B=2, N=13, H=2, D=3, Dv=4, K=5, chunk_size=4),     # N not a multiple of chunk
    dict(B=1, N=1, H=2, D=3, Dv=2, K=3, chunk_size=4),      # N = 1
    dict(B=2, N=9, H=1, D=2, Dv=5, K=1, chunk_size=3),      # K = 1
    dict(B=1, N=70, H=2, D=4, Dv=3, K=4, chunk_size=2),     # 35 chunks: two-level scan, padded
    dict(B=2, N=20, H=3, D=5, Dv=2, K=6, chunk_size=64),    # one chunk bigger than N
]
GRAD_NAMES = ["q", "k", "v", "mu", "omega", "alpha", "S0", "z0"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{N}K{K}C{chunk_size}".format(**s))
def test_chunked_matches_naive(causal, with_mask, with_state, shape):
    shape = dict(shape)
    cs = shape.pop("chunk_size")
    t, m = make_inputs(**shape, state=with_state, mask=with_mask, requires_grad=True, seed=3)
    o1, (S1, z1) = call(naive_gma, t, m, causal)
    o2, (S2, z2) = call(chunked_gma, t, m, causal, chunk_size=cs)
    for a in (o1, S1, z1, o2, S2, z2):
        assert a.dtype == F64
    assert o2.shape == o1.shape == (shape["B"], shape["N"], shape["H"], shape["Dv"])
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S2, S1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z2, z1, rtol=1e-10, atol=1e-12)

    g = torch.Generator().manual_seed(9)
    wo = torch.randn(o1.shape, generator=g, dtype=F64)
    wS = torch.randn(S1.shape, generator=g, dtype=F64)
    wz = torch.randn(z1.shape, generator=g, dtype=F64)
    names = [n for n in GRAD_NAMES if n in t]
    inputs = [t[n] for n in names]
    g1 = torch.autograd.grad((o1 * wo).sum() + (S1 * wS).sum() + (z1 * wz).sum(), inputs)
    g2 = torch.autograd.grad((o2 * wo).sum() + (S2 * wS).sum() + (z2 * wz).sum(), inputs)
    for n, a, b in zip(names, g1, g2):
        assert torch.isfinite(a).all(), n
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=lambda s: f"grad {n}: {s}")


def test_final_state_is_sum_of_writes():
    t, m = make_inputs(B=2, N=10, H=2, D=3, Dv=4, K=3, state=True, mask=True)
    Gk = responsibilities(t["k"], t["mu"], t["omega"], t["alpha"]) * m[:, :, None, None]
    S_ref = t["S0"] + torch.einsum("bnhk,bnhe->bhke", Gk, t["v"])
    z_ref = t["z0"] + Gk.sum(1)
    for fn in (naive_gma, chunked_gma):
        for causal in (False, True):
            _, (S, z) = call(fn, t, m, causal)
            torch.testing.assert_close(S, S_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)


def test_output_is_convex_combination_of_values():
    # no state: out[i] = sum_j A[i,j] v[j] with A row-stochastic (up to eps)
    t, _ = make_inputs(B=1, N=8, H=1, D=2, Dv=3, K=4)
    for causal in (False, True):
        out = call(naive_gma, t, None, causal, final=False, eps=0.0)
        v = t["v"]
        lo = v.cummin(1).values if causal else v.min(1, keepdim=True).values
        hi = v.cummax(1).values if causal else v.max(1, keepdim=True).values
        assert (out >= lo - 1e-12).all() and (out <= hi + 1e-12).all()
    # constant values are reproduced exactly
    t["v"] = torch.full_like(t["v"], 2.5)
    out = call(chunked_gma, t, None, True, final=False, eps=0.0, chunk_size=3)
    torch.testing.assert_close(out, torch.full_like(out, 2.5), rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [naive_gma, chunked_gma], ids=["naive", "chunked"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "mask+state"])
def test_gradcheck(fn, causal, with_extras):
    t, m = make_inputs(B=1, N=4, H=1, D=2, Dv=2, K=2, state=with_extras, mask=with_extras,
                       requires_grad=True, seed=5)
    names = [n for n in GRAD_NAMES if n in t]
    kw = {"chunk_size": 3} if fn is chunked_gma else {}

    def f(*xs):
        d = dict(zip(names, xs))
        st = (d["S0"], d["z0"]) if "S0" in d else None
        out, (S, z) = fn(d["q"], d["k"], d["v"], d["mu"], d["omega"], d["alpha"], causal=causal,
                         key_padding_mask=m, initial_state=st, output_final_state=True, **kw)
        return out, S, z

    assert torch.autograd.gradcheck(f, [t[n] for n in names], eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# split-resume, masks
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [naive_gma, chunked_gma], ids=["naive", "chunked"])
@pytest.mark.parametrize("split", [1, 5, 11])
def test_split_resume_causal(fn, split):
    t, m = make_inputs(B=2, N=12, H=2, D=3, Dv=4, K=3, state=True, mask=True, seed=7)
    kw = {"chunk_size": 4} if fn is chunked_gma else {}
    out, (S, z) = call(fn, t, m, True, **kw)
    a = {n: t[n][:, :split] for n in ("q", "k", "v")}
    b = {n: t[n][:, split:] for n in ("q", "k", "v")}
    p = (t["mu"], t["omega"], t["alpha"])
    oa, sa = fn(a["q"], a["k"], a["v"], *p, causal=True, key_padding_mask=m[:, :split],
                initial_state=(t["S0"], t["z0"]), output_final_state=True, **kw)
    ob, (Sb, zb) = fn(b["q"], b["k"], b["v"], *p, causal=True, key_padding_mask=m[:, split:],
                      initial_state=sa, output_final_state=True, **kw)
    torch.testing.assert_close(torch.cat([oa, ob], 1), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Sb, S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zb, z, rtol=1e-12, atol=1e-12)


def test_bidirectional_reads_initial_state_and_all_keys():
    # bidirectional with a state: every query sees S0 + all keys of this call, so two
    # halves chained through the state give the second half the full picture
    t, _ = make_inputs(B=1, N=8, H=2, D=3, Dv=2, K=3, state=True, seed=8)
    p = (t["mu"], t["omega"], t["alpha"])
    _, sa = naive_gma(t["q"][:, :3], t["k"][:, :3], t["v"][:, :3], *p,
                      initial_state=(t["S0"], t["z0"]), output_final_state=True)
    ob = naive_gma(t["q"][:, 3:], t["k"][:, 3:], t["v"][:, 3:], *p, initial_state=sa)
    full = naive_gma(t["q"], t["k"], t["v"], *p, initial_state=(t["S0"], t["z0"]))
    torch.testing.assert_close(ob, full[:, 3:], rtol=1e-12, atol=1e-12)
    oc = chunked_gma(t["q"][:, 3:], t["k"][:, 3:], t["v"][:, 3:], *p, initial_state=sa)
    torch.testing.assert_close(oc, full[:, 3:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [naive_gma, chunked_gma], ids=["naive", "chunked"])
@pytest.mark.parametrize("causal", [False, True])
def test_masked_keys_equal_dropped_keys(fn, causal):
    t, m = make_inputs(B=2, N=11, H=2, D=3, Dv=4, K=3, state=True, mask=True, seed=11,
                       requires_grad=True)
    kw = {"chunk_size": 4} if fn is chunked_gma else {}
    p = (t["mu"], t["omega"], t["alpha"])
    st = (t["S0"], t["z0"])
    out, (S, z) = call(fn, t, m, causal, **kw)
    for b in range(2):
        keep = m[b].nonzero().squeeze(1)
        qb, kb, vb = (t[n][b:b + 1, keep] for n in ("q", "k", "v"))
        stb = (t["S0"][b:b + 1], t["z0"][b:b + 1])
        # kept positions: same as the sequence with the masked tokens removed
        ob, (Sb, zb) = fn(qb, kb, vb, *p, causal=causal, initial_state=stb,
                          output_final_state=True, **kw)
        torch.testing.assert_close(out[b:b + 1, keep], ob, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(S[b:b + 1], Sb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z[b:b + 1], zb, rtol=1e-12, atol=1e-12)
        # masked positions: the query reads S0 plus the kept keys it can see
        with torch.no_grad():
            Gq = responsibilities(t["q"][b:b + 1], *p)[0]                  # (N, H, K)
            Gk = responsibilities(t["k"][b:b + 1], *p)[0]
            for i in (~m[b]).nonzero().squeeze(1).tolist():
                vis = keep[keep < i] if causal else keep
                S_vis = t["S0"][b] + torch.einsum("nhk,nhe->hke", Gk[vis], t["v"][b, vis])
                z_vis = t["z0"][b] + Gk[vis].sum(0)
                num = torch.einsum("hk,hke->he", Gq[i], S_vis)
                den = torch.einsum("hk,hk->h", Gq[i], z_vis) + 1e-6
                torch.testing.assert_close(out[b, i], num / den[:, None], rtol=1e-12, atol=1e-12)
    # masked keys and values get exactly zero gradient and cannot influence anything
    gk, gv = torch.autograd.grad(out.sum() + S.sum() + z.sum(), [t["k"], t["v"]])
    assert torch.all(gk[~m] == 0) and torch.all(gv[~m] == 0)
    assert gk[m].abs().sum() > 0 and gv[m].abs().sum() > 0
    # garbage in masked keys and values changes nothing
    t2 = dict(t)
    with torch.no_grad():
        t2["k"] = torch.where(m[:, :, None, None], t["k"], 30.0)
        t2["v"] = torch.where(m[:, :, None, None], t["v"], 1e6)
    torch.testing.assert_close(call(fn, t2, m, causal, final=False, **kw), out.detach(),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_float32_and_bfloat16(causal):
    t64, m = make_inputs(B=2, N=50, H=2, D=8, Dv=8, K=4, state=True, mask=True, seed=13)
    ref, (S_ref, z_ref) = call(naive_gma, t64, m, causal)
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        t = {n: x.to(dt) for n, x in t64.items()}
        t["S0"], t["z0"] = t64["S0"].float(), t64["z0"].float()   # state stays float32
        for fn in (naive_gma, chunked_gma):
            if fn is naive_gma and dt == torch.bfloat16:
                continue
            out, (S, z) = call(fn, t, m, causal, chunk_size=16) if fn is chunked_gma \
                else call(fn, t, m, causal)
            assert out.dtype == dt and S.dtype == torch.float32 and z.dtype == torch.float32
            err = (out.double() - ref).abs().max().item()
            assert err < tol * ref.abs().max().item(), (fn.__name__, dt, err)
            torch.testing.assert_close(S.double(), S_ref, rtol=tol, atol=tol)
            torch.testing.assert_close(z.double(), z_ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------

def _bad_cases():
    t, _ = make_inputs(B=2, N=5, H=2, D=3, Dv=4, K=3)
    S0, z0 = torch.zeros(2, 2, 3, 4, dtype=F64), torch.zeros(2, 2, 3, dtype=F64)
    yield "q", dict(q=t["q"][0])
    yield "k", dict(k=t["k"][:, :4])
    yield "v", dict(v=t["v"][:, :, :1])
    yield "q, k, v", dict(v=t["v"].float())
    yield "mu", dict(mu=t["mu"][:, :, :2], omega=t["omega"][:, :, :2])
    yield "mu", dict(mu=t["mu"][0])
    yield "omega", dict(omega=t["omega"][:, :2])
    yield "alpha", dict(alpha=t["alpha"][:, :2])
    yield "K >= 1", dict(mu=t["mu"][:, :0], omega=t["omega"][:, :0], alpha=t["alpha"][:, :0])
    yield "N >= 1", dict(q=t["q"][:, :0], k=t["k"][:, :0], v=t["v"][:, :0])
    yield "key_padding_mask", dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    yield "key_padding_mask", dict(key_padding_mask=torch.ones(2, 5))
    yield "initial_state", dict(initial_state=(S0,))
    yield r"initial_state\[0\]", dict(initial_state=(S0[:, :, :, :3], z0))
    yield r"initial_state\[1\]", dict(initial_state=(S0, z0[:, :1]))


@pytest.mark.parametrize("fn", [naive_gma, chunked_gma], ids=["naive", "chunked"])
def test_bad_input_raises_value_error_naming_the_argument(fn):
    t, _ = make_inputs(B=2, N=5, H=2, D=3, Dv=4, K=3)
    n_cases = 0
    for name, override in _bad_cases():
        args = dict(t, key_padding_mask=None, initial_state=None)
        args.update(override)
        with pytest.raises(ValueError, match=name):
            fn(args["q"], args["k"], args["v"], args["mu"], args["omega"], args["alpha"],
               key_padding_mask=args["key_padding_mask"], initial_state=args["initial_state"])
        n_cases += 1
    assert n_cases == 15
    if fn is chunked_gma:
        with pytest.raises(ValueError, match="chunk_size"):
            fn(t["q"], t["k"], t["v"], t["mu"], t["omega"], t["alpha"], chunk_size=0)
    with pytest.raises(ValueError, match="x must"):
        responsibilities(t["q"][0], t["mu"], t["omega"], t["alpha"])
