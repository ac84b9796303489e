"""Context parallelism and data parallelism over torch.distributed (gloo, CPU processes).

Each test spawns 2 or 3 processes that run a whole list of cases and save what they computed;
the parent compares it with one process computing the whole sequence / batch. float64 throughout,
so the comparisons are to rounding.
"""

from __future__ import annotations

import os
import tempfile

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
mp = pytest.importorskip("torch.multiprocessing")

import gmattn  # noqa: E402
from gmattn.mixers import build_model  # noqa: E402

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

from conftest import make_problem  # noqa: E402

SHARDS = {2: [13, 24], 3: [9, 20, 8]}      # uneven shards of one sequence of 37 / 37 tokens


def _spawn(worker, world: int, *args):
    """Runs worker(rank, world, init_file, out_dir, *args) in `world` processes; returns the
    per-rank results (whatever each saved as out_dir/rank{r}.pt)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(worker, args=(world, init_file, tmp) + args, nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _bounds(world: int):
    lengths = SHARDS[world]
    starts = [sum(lengths[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, lengths)]


# --------------------------------------------------------------------------------------------
# The op: outputs and every gradient equal one process on the whole sequence
# --------------------------------------------------------------------------------------------
CASES = [dict(causal=c, mask=m) for c in (True, False) for m in (False, True)]


def _problem(case):
    return make_problem(B=2, N=37, H=2, K=5, D=4, Dv=3, mask=case["mask"], seed=7)


def _loss_weights(case):
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, 37, 2, 3, generator=g, dtype=torch.float64)


def _op_worker(rank, world, init_file, out_dir):
    from gmattn.torch import distributed as cp

    _init(rank, world, init_file)
    lo, hi = _bounds(world)[rank]
    results = []
    for case in CASES:
        p = _problem(case)
        q, k, v = (t.detach()[:, lo:hi].clone().requires_grad_() for t in (p.q, p.k, p.v))
        mu, omega, alpha = (t.detach().clone().requires_grad_() for t in (p.mu, p.omega, p.alpha))
        mask = None if p.mask is None else p.mask[:, lo:hi]
        out = cp.gma_attention(q, k, v, mu, omega, alpha, causal=case["causal"], key_padding_mask=mask)
        (out * _loss_weights(case)[:, lo:hi]).sum().backward()
        results.append({"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
                        "dmu": mu.grad, "domega": omega.grad, "dalpha": alpha.grad})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel_op_equals_one_process(world):
    per_rank = _spawn(_op_worker, world)
    bounds = _bounds(world)
    for i, case in enumerate(CASES):
        p = _problem(case)
        out = gmattn.gma_attention(p.q, p.k, p.v, p.mu, p.omega, p.alpha, causal=case["causal"],
                                   key_padding_mask=p.mask)
        (out * _loss_weights(case)).sum().backward()
        for name, whole in (("out", out.detach()), ("dq", p.q.grad), ("dk", p.k.grad), ("dv", p.v.grad)):
            for r, (lo, hi) in enumerate(bounds):
                torch.testing.assert_close(per_rank[r][i][name], whole[:, lo:hi], rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"{case} rank {r} {name}: {m}")
        # Each rank holds its share of the parameter gradients; their sum is the whole gradient.
        for name, whole in (("dmu", p.mu.grad), ("domega", p.omega.grad), ("dalpha", p.alpha.grad)):
            total = sum(per_rank[r][i][name] for r in range(world))
            torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12, msg=lambda m: f"{case} {name}: {m}")


# --------------------------------------------------------------------------------------------
# Models: a context-parallel SequenceModel, a DDP step, an FSDP2 step
# --------------------------------------------------------------------------------------------
MODEL = dict(kind="gma", d_model=16, num_heads=2, num_components=4, causal=True)


def _model(max_len=None):
    torch.manual_seed(3)
    return build_model(MODEL, vocab_size=11, num_layers=2, max_len=max_len).double()


def _tokens(B, N, seed=5):
    return torch.randint(0, 11, (B, N), generator=torch.Generator().manual_seed(seed))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _cp_model_worker(rank, world, init_file, out_dir):
    from gmattn.torch.distributed import ContextParallelModel

    _init(rank, world, init_file)
    lo, hi = _bounds(world)[rank]
    model = ContextParallelModel(_model(max_len=64))
    logits = model(_tokens(2, 37)[:, lo:hi])
    (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=torch.float64)).sum().backward()
    torch.save({"logits": logits.detach(), "grads": _grads(model.model)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_context_parallel_model_equals_one_process():
    world = 2
    per_rank = _spawn(_cp_model_worker, world)
    model = _model(max_len=64)
    logits = model(_tokens(2, 37))
    (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=torch.float64)).sum().backward()
    for r, (lo, hi) in enumerate(_bounds(world)):
        torch.testing.assert_close(per_rank[r]["logits"], logits.detach()[:, lo:hi], rtol=1e-11, atol=1e-11)
    for name, whole in _grads(model).items():
        torch.testing.assert_close(sum(per_rank[r]["grads"][name] for r in range(world)), whole,
                                   rtol=1e-10, atol=1e-11, msg=lambda m: f"{name}: {m}")


def _step(model, tokens, lr=0.1):
    """One SGD step on the mean next-token loss; returns the parameters after it."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()


def _data_parallel_worker(rank, world, init_file, out_dir, how):
    _init(rank, world, init_file)
    model = _model()
    batch = _tokens(2 * world, 21)[2 * rank: 2 * rank + 2]
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        _step(DistributedDataParallel(model), batch)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        _step(model, batch)
        params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_data_parallel_step_equals_one_process(how):
    if how == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp.fully_shard")
    world = 2
    per_rank = _spawn(_data_parallel_worker, world, how)
    model = _model()
    _step(model, _tokens(2 * world, 21))          # the whole batch in one process: the same mean loss
    for name, p in model.named_parameters():
        for r in range(world):
            torch.testing.assert_close(per_rank[r][name], p.detach(), rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{how} rank {r} {name}: {m}")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_context_parallel_needs_an_initialised_group():
    from gmattn.torch import distributed as cp

    p = make_problem(B=1, N=4, H=1, K=2, D=2, Dv=2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.gma_attention(p.q, p.k, p.v, p.mu, p.omega, p.alpha)


def test_context_parallel_refuses_other_mixers_and_states():
    from gmattn.torch import distributed as cp

    softmax = build_model(dict(MODEL, kind="softmax"), vocab_size=11)
    with pytest.raises(ValueError, match="only GMA mixers"):
        cp.context_parallel(softmax)
    with pytest.raises(ValueError, match="'lm' head"):
        cp.ContextParallelModel(build_model(MODEL, vocab_size=11, head="classification", num_classes=3))
    layer = gmattn.torch.GaussianMixtureAttention(8, 2, 3)
    layer.context_parallel = True          # as context_parallel() sets it, without a process group
    with pytest.raises(ValueError, match="takes no state"):
        layer(torch.randn(1, 4, 8), return_state=True)


def test_torchrun_example_runs_and_matches_one_process():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "train_context_parallel.py"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                          "--steps", "2", "--length", "96", "--batch-size", "2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    check = re.search(r"check: context-parallel loss ([\d.]+), one process ([\d.]+)", run.stdout)
    assert check, run.stdout
    assert abs(float(check.group(1)) - float(check.group(2))) < 1e-5, check.group(0)
