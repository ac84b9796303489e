"""Decoding: time per generated token against the context already seen, for every mixer kind.

    python benchmarks/decode.py [--contexts 1024 4096 16384 65536] [--quick] [--out DIR]

A causal SequenceModel of each kind (same width, depth, heads) reads a prompt of C tokens, then
generates one token per call with its carried state: GMA, linear, performer and ssm keep a state
of constant size, softmax a KV cache of C tokens. Timed per kind and context in one round-robin
(median of many steps), with the state's size in bytes. The softmax cache at contexts above
--softmax-prompt-max is the cache of a real prompt of that length repeated (same size and cost
per step; building it by one prompt of 64k tokens takes minutes of O(N^2) attention here).

Second section: one decoding step of the op alone (B = 1, one new token, H = 8, K = 64,
D = Dv = 64, float32, 1 thread, carried state) through gmattn.gma_attention on torch tensors and
on NumPy arrays (new state arrays per step, and the state updated in place), against a
plain-PyTorch recurrent step of the same math and the arithmetic bound (the step's flops at the
rate of a float32 matmul measured in the same run).

Writes decode.json and decode.png (time per token against context) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import gmattn
from gmattn.mixers import KINDS, build_model

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    def tqdm(iterable, **_):
        return iterable


def state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (tuple, list)):
        return sum(state_bytes(s) for s in state)
    return 0


def repeat_cache(state, times: int):
    """A softmax model state (offset, [(k, v, mask) per block]) with each cache repeated `times`."""
    offset, blocks = state
    return offset * times, [tuple(torch.cat([t] * times, dim=2 if t.dim() == 4 else 1) for t in kv) for kv in blocks]


def decode_section(args) -> dict:
    torch.set_num_threads(args.threads)
    kinds = [k for k in KINDS if k in args.kinds]
    results = {k: {} for k in kinds}
    max_ctx = max(args.contexts)
    prompts = {}
    for kind in tqdm(kinds, desc="prompts"):
        torch.manual_seed(0)
        config = dict(kind=kind, d_model=args.d_model, num_heads=args.heads, causal=True, seed=0)
        if kind == "gma":
            config["num_components"] = args.components
        model = build_model(config, vocab_size=256, num_layers=args.layers, max_len=max_ctx + 4096).eval()
        for C in args.contexts:
            prompt_len = C if kind != "softmax" else min(C, args.softmax_prompt_max)
            tokens = torch.randint(0, 256, (1, prompt_len), generator=torch.Generator().manual_seed(C))
            with torch.inference_mode():
                _, state = model(tokens, return_state=True)
            if prompt_len < C:
                state = repeat_cache(state, C // prompt_len)
            prompts[kind, C] = (model, state)
            results[kind][C] = {"state_bytes": state_bytes(state[1]), "prompt_tokens": prompt_len}
    token = torch.zeros(1, 1, dtype=torch.long)
    samples = {key: [] for key in prompts}
    for _ in tqdm(range(args.rounds), desc="decode rounds"):
        for key, (model, state) in prompts.items():      # round-robin over kinds and contexts
            with torch.inference_mode():
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    model(token, state=state, return_state=True)  # one step from the same context
                    samples[key].append(time.perf_counter() - t0)
    for (kind, C), ts in samples.items():
        results[kind][C]["ms_per_token"] = statistics.median(ts) * 1e3
    return results


def plain_torch_step(q, k, v, mu, omega, alpha, S, z, eps=1e-6, sigma_eps=1e-4):
    """The recurrent step of GMA in plain PyTorch: one token, state (S, z) carried."""
    sigma2 = F.softplus(omega) + sigma_eps
    lam = 1.0 / sigma2
    const = torch.log_softmax(alpha, -1) - 0.5 * torch.log(sigma2).sum(-1)

    def gamma(x):                                   # x (B, H, D) -> (B, H, K)
        d = x.unsqueeze(-2) - mu
        return torch.softmax(const - 0.5 * (lam * d * d).sum(-1), -1)

    gq, gk = gamma(q[:, 0]), gamma(k[:, 0])
    S = S + gk.unsqueeze(-1) * v[:, 0].unsqueeze(-2)
    z = z + gk
    out = (gq.unsqueeze(-2) @ S).squeeze(-2) / ((gq * z).sum(-1, keepdim=True) + eps)
    return out.unsqueeze(1), (S, z)


def op_step_times(rounds: int, steps: int) -> dict:
    """One decoding step of the op (B = 1, one new token, H = 8, K = 64, D = Dv = 64, float32,
    1 thread, carried state) through gmattn.gma_attention on torch tensors and on NumPy arrays,
    against plain_torch_step and the arithmetic bound, all timed in one round-robin: `rounds`
    rounds of `steps` calls each. Returns {"us": median us per call, "arithmetic_bound_us", ...}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _op_step_times(rounds, steps)
    finally:
        torch.set_num_threads(threads)


def _op_step_times(rounds: int, steps: int) -> dict:
    H, K, D = 8, 64, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, H, D, generator=g) for _ in range(3))
    mu, omega, alpha = torch.randn(H, K, D, generator=g), torch.zeros(H, K, D), torch.zeros(H, K)
    S, z = torch.rand(1, H, K, D, generator=g), torch.rand(1, H, K, generator=g) + 1
    arrays = [t.numpy() for t in (q, k, v, mu, omega, alpha)]
    np_state = (S.numpy(), z.numpy())
    carried = (S.numpy().copy(), z.numpy().copy())
    ours, _ = gmattn.gma_attention(q, k, v, mu, omega, alpha, causal=True, initial_state=(S, z),
                                   output_final_state=True)
    plain, _ = plain_torch_step(q, k, v, mu, omega, alpha, S, z)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)   # the same step, before timing it
    calls = {
        "gmattn.gma_attention (torch)": lambda: gmattn.gma_attention(
            q, k, v, mu, omega, alpha, causal=True, initial_state=(S, z), output_final_state=True),
        "gmattn.gma_attention (NumPy)": lambda: gmattn.gma_attention(
            *arrays, causal=True, initial_state=np_state, output_final_state=True),
        # the decoding loop's way: the carried state updated in place (it drifts over the steps
        # timed, which changes nothing in the work)
        "gmattn.gma_attention (NumPy, state_in_place)": lambda: gmattn.gma_attention(
            *arrays, causal=True, initial_state=carried, output_final_state=True, state_in_place=True),
        "plain PyTorch step": lambda: plain_torch_step(q, k, v, mu, omega, alpha, S, z),
    }
    a = torch.randn(1024, 1024)
    calls["float32 matmul 1024^3"] = lambda: a @ a
    samples = {name: [] for name in calls}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, fn in calls.items():
                for _ in range(steps):
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - t0)
    us = {name: statistics.median(ts) * 1e6 for name, ts in samples.items()}
    rate = 2 * 1024 ** 3 / (us.pop("float32 matmul 1024^3") * 1e-6)       # flop/s of the matmul
    # Two responsibilities (q, k): 3 flops per component and dimension; the write and the read of
    # the state: 2 K Dv each; denominators 2 K each.
    flops = H * (2 * 3 * K * D + 4 * K * D + 4 * K)
    return {"us": us, "arithmetic_bound_us": flops / rate * 1e6, "flops": flops, "matmul_gflops": rate / 1e9}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, per_ctx in results.items():
        ctx = sorted(per_ctx)
        ax.plot(ctx, [per_ctx[c]["ms_per_token"] for c in ctx], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context already seen (tokens)")
    ax.set_ylabel("time per generated token (ms)")
    ax.set_title("Decoding one token with the carried state")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--components", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps per kind and context in each round")
    ap.add_argument("--softmax-prompt-max", type=int, default=16384)
    ap.add_argument("--quick", action="store_true", help="small contexts and few steps (a smoke run)")
    ap.add_argument("--out", default="benchmarks/results/decode")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.rounds, args.steps, args.softmax_prompt_max = [256, 1024], 2, 3, 512
    os.makedirs(args.out, exist_ok=True)

    results = decode_section(args)
    print(f"\nTime per generated token (ms, median), d_model={args.d_model}, {args.layers} layers, "
          f"{args.heads} heads, {args.threads} threads; state size in parentheses")
    ctx = sorted(args.contexts)
    print(f"| kind | " + " | ".join(f"{c} tokens" for c in ctx) + " | max/min |")
    print("|---|" + "---:|" * (len(ctx) + 1))
    for kind, per in results.items():
        ms = [per[c]["ms_per_token"] for c in ctx]
        cells = " | ".join(f"{m:.3f} ({per[c]['state_bytes'] / 2**20:.2f} MiB)" for m, c in zip(ms, ctx))
        print(f"| {kind} | {cells} | {max(ms) / min(ms):.2f} |")
    if "gma" in results and "softmax" in results:
        for c in ctx:
            r = results["softmax"][c]["ms_per_token"] / results["gma"][c]["ms_per_token"]
            print(f"softmax / gma per token at {c} tokens of context: {r:.2f}x")

    step = op_step_times(args.rounds, args.steps)
    print(f"\nOne decoding step of the op (B=1, H=8, K=64, D=Dv=64, float32, 1 thread), median us:")
    base = step["us"]["plain PyTorch step"]
    for name, us in step["us"].items():
        print(f"  {name:30s} {us:9.1f} us   {us / base:5.2f}x the plain-PyTorch step")
    print(f"  arithmetic bound               {step['arithmetic_bound_us']:9.2f} us   "
          f"({step['flops'] / 1e6:.2f} MFLOP at the matmul's {step['matmul_gflops']:.1f} GFLOP/s)")

    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump({"decode": {k: {str(c): v for c, v in per.items()} for k, per in results.items()},
                   "step": step, "args": vars(args)}, f, indent=1)
    plot(results, os.path.join(args.out, "decode.png"))
    print(f"\nwrote {args.out}/decode.json and decode.png")


if __name__ == "__main__":
    main()
