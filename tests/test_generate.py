"""SequenceModel.generate in both frameworks, every mixer kind."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gmattn.mixers import KINDS, available_frameworks, build_model  # noqa: E402
from gmattn.mixers._common import sample_tokens  # noqa: E402

VOCAB = 13


def _model(kind, framework="torch", **extra):
    torch.manual_seed(0)
    config = dict(kind=kind, d_model=24, num_heads=2, causal=True, seed=0)
    if kind == "gma":
        config["num_components"] = 6
    model = build_model(config, framework, vocab_size=VOCAB, num_layers=2, max_len=64, **extra)
    if framework == "torch":
        return model.eval()
    model.eval()
    return model


def _prompt(B=2, N=5):
    return np.random.default_rng(1).integers(0, VOCAB, (B, N))


def _greedy_by_full_forwards(model, tokens, steps, to_framework, to_numpy):
    """The reference: the arg-max of a full forward over everything so far, one token at a time."""
    seq = tokens
    for _ in range(steps):
        logits = to_numpy(model(to_framework(seq))[:, -1])
        seq = np.concatenate([seq, logits.argmax(-1)[:, None]], axis=1)
    return seq


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_equals_full_forward_argmax_torch(kind):
    model = _model(kind)
    prompt = _prompt()
    with torch.no_grad():
        expected = _greedy_by_full_forwards(model, prompt, 12, torch.as_tensor,
                                            lambda t: t.float().numpy())
    got = model.generate(torch.as_tensor(prompt), 12, temperature=0)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.skipif("mlx" not in available_frameworks(), reason="MLX is not installed")
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_equals_full_forward_argmax_mlx(kind):
    import mlx.core as mx

    model = _model(kind, "mlx")
    prompt = _prompt()
    expected = _greedy_by_full_forwards(model, prompt, 12, lambda a: mx.array(a.astype(np.int32)),
                                        lambda a: np.array(a.astype(mx.float32)))
    got = model.generate(mx.array(prompt.astype(np.int32)), 12, temperature=0)
    assert isinstance(got, mx.array)
    np.testing.assert_array_equal(np.array(got), expected)


def test_sampling_is_seeded_and_matches_between_frameworks():
    model = _model("gma")
    prompt = torch.as_tensor(_prompt())
    a = model.generate(prompt, 10, temperature=0.8, top_k=5, seed=3)
    b = model.generate(prompt, 10, temperature=0.8, top_k=5, seed=3)
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 15) and torch.equal(a[:, :5], prompt)
    if "mlx" in available_frameworks():
        import mlx.core as mx

        twin = _model("gma", "mlx").import_weights(model.export_weights())
        c = twin.generate(mx.array(prompt.numpy().astype(np.int32)), 10, temperature=0.8, top_k=5, seed=3)
        np.testing.assert_array_equal(np.array(c), a.numpy())


def test_eos_stops_rows_and_generation():
    model = _model("linear")
    prompt = torch.as_tensor(_prompt())
    free = model.generate(prompt, 8, temperature=0)
    eos = int(free[0, 5])                   # the first token row 0 generates
    out = model.generate(prompt, 8, temperature=0, eos_token=eos)
    assert out[0, 5] == eos and torch.all(out[0, 5:] == eos)
    for row in range(out.shape[0]):         # a row is the free continuation up to its first eos
        gen = out[row, 5:]
        hits = (gen == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else gen.numel()
        torch.testing.assert_close(gen[:stop], free[row, 5:5 + stop])
    if torch.all((out[:, 5:] == eos).any(1)):
        assert out.shape[1] <= free.shape[1]


def test_sample_tokens_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = np.array([sample_tokens(logits, 1.0, None, None, rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    # top_k=2 keeps the two most likely, renormalised
    draws = np.array([sample_tokens(logits, 1.0, 2, None, rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, [0.625, 0.375, 0, 0], atol=0.015)
    # top_p=0.75: 0.5 + 0.3 reaches it, so the nucleus is the first two
    draws = np.array([sample_tokens(logits, 1.0, None, 0.75, rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, [0.625, 0.375, 0, 0], atol=0.015)
    # top_p=0.81 needs the third token too
    draws = np.array([sample_tokens(logits, 1.0, None, 0.81, rng)[0] for _ in range(20000)])
    assert np.bincount(draws, minlength=4)[2] > 0 and np.bincount(draws, minlength=4)[3] == 0
    # temperature -> 0 is greedy; a high temperature flattens
    assert sample_tokens(logits, 0, None, None, rng)[0] == 0
    draws = np.array([sample_tokens(logits, 100.0, None, None, rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, 0.25, atol=0.02)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=3, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=3, top_k=0), "top_k"),
    (dict(max_new_tokens=3, top_p=1.5), "top_p"),
    (dict(max_new_tokens=3, eos_token=VOCAB), "eos_token"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    model = _model("gma")
    with pytest.raises(ValueError, match=match):
        model.generate(torch.as_tensor(_prompt()), **kwargs)


def test_generate_needs_a_causal_lm():
    bidirectional = build_model(dict(kind="gma", d_model=16, num_heads=2, num_components=4), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="causal"):
        bidirectional.generate(torch.as_tensor(_prompt()), 3)
    classifier = build_model(dict(kind="gma", d_model=16, num_heads=2, num_components=4, causal=True),
                             vocab_size=VOCAB, head="classification", num_classes=3)
    with pytest.raises(ValueError, match="'lm' head"):
        classifier.generate(torch.as_tensor(_prompt()), 3)


def test_generate_zero_tokens_returns_the_prompt():
    prompt = torch.as_tensor(_prompt())
    assert torch.equal(_model("softmax").generate(prompt, 0), prompt)


def test_decode_benchmark_quick_run(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
    run = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "decode.json").read_text())
    assert set(data["decode"]) == set(KINDS)
    for kind, per_ctx in data["decode"].items():
        assert set(per_ctx) == {"256", "1024"}
        sizes = {c: v["state_bytes"] for c, v in per_ctx.items()}
        assert all(v["ms_per_token"] > 0 for v in per_ctx.values())
        if kind == "softmax":            # the KV cache grows with the context, the other states do not
            assert sizes["1024"] == 4 * sizes["256"]
        else:
            assert sizes["1024"] == sizes["256"] > 0
    assert (tmp_path / "decode.png").stat().st_size > 0
    assert "softmax / gma per token" in run.stdout
