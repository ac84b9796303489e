"""The tasks: how each builds its model, draws its training stream and evaluates.

A task's training stream depends on the seed alone and its evaluation set on nothing (a fixed
generator, EVAL_SEED), so every kind and every ablation variant of one seed trains on the same
batches in the same order and is scored on the same examples.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from . import data
from .training import Batch, Budget, batches_from, build_model, evaluate, evaluate_groups, fixed_batches, to_torch

EVAL_SEED = 987654321
INIT_BATCH_SEED = 123456789
"""Seed of the batch that data-dependent initialisations (GMAOptions.mean_init="data") read."""


SMALL = Budget(d_model=64, num_layers=2, num_heads=4, num_components=32, seq_len=128, batch_size=16, steps=400,
               lr=3e-3, warmup=40, eval_every=50, eval_batches=8)
"""The default budget (what this 2-core machine could afford for every kind at 3 seeds); tasks
change the sequence length and batch."""
QUICK = Budget(d_model=16, num_layers=2, num_heads=2, num_components=4, seq_len=32, batch_size=4, steps=6, lr=3e-3,
               warmup=2, eval_every=3, eval_batches=2)
"""--quick: seconds per experiment (tests, smoke checks)."""


class Task:
    """Base: a model head, a training stream and an evaluation. Subclasses set the fields."""

    name = ""
    causal = False
    head = "lm"
    vocab_size = 0
    num_classes: Optional[int] = None
    pooling = "mean"
    default_budget = Budget()
    quick_budget = Budget()

    def __init__(self, budget: Budget):
        self.budget = budget

    def build(self, kind: str, seed: int, **config_overrides):
        return build_model(kind, self.budget, vocab_size=self.vocab_size, causal=self.causal, seed=seed,
                           head=self.head, num_classes=self.num_classes, pooling=self.pooling,
                           max_len=self.max_len(), **config_overrides)

    def max_len(self) -> int:
        return self.budget.seq_len

    def make_batch(self, rng: np.random.Generator):
        raise NotImplementedError

    def train_stream(self, seed: int) -> Callable[[int], Batch]:
        return batches_from(self.make_batch, seed)

    def init_batch(self) -> Batch:
        return to_torch(self.make_batch(np.random.default_rng(INIT_BATCH_SEED)))

    def evaluate(self, model) -> Dict[str, float]:
        if not hasattr(self, "_eval_batches"):
            self._eval_batches = fixed_batches(self.make_batch, self.budget.eval_batches, EVAL_SEED)
        return evaluate(model, self._eval_batches)

    def describe(self) -> Dict[str, Any]:
        return {"task": self.name, "causal": self.causal, "head": self.head, "vocab_size": self.vocab_size,
                "num_classes": self.num_classes}


class ByteLM(Task):
    """Byte-level causal language model on Shakespeare's plays (validation: held-out plays)."""

    name = "lm"
    causal = True
    vocab_size = 256
    default_budget = SMALL
    quick_budget = QUICK

    def __init__(self, budget: Budget, data_path: Optional[str] = None):
        super().__init__(budget)
        self.train_bytes, self.val_bytes, self.val_plays = data.load_shakespeare(data_path)
        for name, arr in (("training", self.train_bytes), ("validation", self.val_bytes)):
            if len(arr) < budget.seq_len + 2:
                raise ValueError(f"lm: the {name} text has {len(arr)} bytes, fewer than seq_len + 2")

    def make_batch(self, rng):
        starts = rng.integers(0, len(self.train_bytes) - self.budget.seq_len - 1, size=self.budget.batch_size)
        return data.byte_windows(self.train_bytes, starts, self.budget.seq_len)

    def validation_batches(self):
        """Fixed windows spread evenly over the held-out plays."""
        B, N = self.budget.batch_size, self.budget.seq_len
        starts = np.linspace(0, len(self.val_bytes) - N - 2, self.budget.eval_batches * B).astype(np.int64)
        return [to_torch(data.byte_windows(self.val_bytes, starts[i * B:(i + 1) * B], N))
                for i in range(self.budget.eval_batches)]

    def evaluate(self, model):
        if not hasattr(self, "_eval_batches"):
            self._eval_batches = self.validation_batches()
        metrics = evaluate(model, self._eval_batches)
        metrics["bits_per_byte"] = metrics["loss"] / math.log(2)
        return metrics

    def describe(self):
        return {**super().describe(), "train_bytes": int(len(self.train_bytes)),
                "validation_bytes": int(len(self.val_bytes)), "validation_plays": self.val_plays}


class MQAR(Task):
    """Multi-query associative recall: accuracy at every number of key-value pairs."""

    name = "mqar"
    causal = True
    default_budget = SMALL.replace(seq_len=32, batch_size=64, eval_batches=2)
    quick_budget = QUICK.replace(seq_len=24, eval_batches=1)

    def __init__(self, budget: Budget, pair_counts: Sequence[int], num_keys: int = 16, num_values: int = 16):
        super().__init__(budget)
        self.pair_counts = tuple(int(p) for p in pair_counts)
        self.num_keys, self.num_values = num_keys, num_values
        self.vocab_size = data.mqar_vocab_size(num_keys, num_values)
        for p in self.pair_counts:  # fail now, not at the first batch with that count
            data.mqar_example(np.random.default_rng(0), budget.seq_len, p, num_keys, num_values)

    def make_batch(self, rng, pair_counts=None):
        return data.mqar_batch(rng, self.budget.batch_size, self.budget.seq_len, pair_counts or self.pair_counts,
                               self.num_keys, self.num_values)

    def evaluate(self, model):
        if not hasattr(self, "_eval_groups"):
            self._eval_groups = {str(p): fixed_batches(lambda rng, p=p: self.make_batch(rng, (p,)),
                                                       self.budget.eval_batches, EVAL_SEED + p)
                                 for p in self.pair_counts}
        return evaluate_groups(model, self._eval_groups)

    def describe(self):
        return {**super().describe(), "pair_counts": list(self.pair_counts), "num_keys": self.num_keys,
                "num_values": self.num_values}


class ListOps(Task):
    """ListOps classification (10 classes), expressions of min_length..max_length tokens."""

    name = "listops"
    head = "classification"
    num_classes = 10
    vocab_size = len(data.LISTOPS_TOKENS)
    default_budget = SMALL.replace(seq_len=512)
    quick_budget = QUICK.replace(seq_len=48)

    def __init__(self, budget: Budget, min_length: Optional[int] = None):
        super().__init__(budget)
        self.max_length = budget.seq_len
        self.min_length = min_length if min_length is not None else max(1, budget.seq_len // 4)
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"listops: need 1 <= min_length <= seq_len, got {self.min_length}, {self.max_length}")

    def make_batch(self, rng):
        rows = [data.listops_example(rng, self.min_length, self.max_length) for _ in range(self.budget.batch_size)]
        return data.pad_batch([r[0] for r in rows], [r[1] for r in rows])

    def describe(self):
        return {**super().describe(), "min_length": self.min_length, "max_length": self.max_length}


class FashionMNIST(Task):
    """Fashion-MNIST as 784-pixel sequences (row-major, one token per 8-bit pixel), 10 classes."""

    name = "fashion_mnist"
    head = "classification"
    num_classes = 10
    vocab_size = 256
    default_budget = SMALL.replace(seq_len=784)
    quick_budget = QUICK.replace(seq_len=784, steps=4, eval_every=2)

    def __init__(self, budget: Budget, data_dir: Optional[str] = None):
        super().__init__(budget)
        (self.train_x, self.train_y), (self.test_x, self.test_y) = data.load_fashion_mnist(data_dir)
        if self.train_x.shape[1] != budget.seq_len:
            raise ValueError(f"fashion_mnist: images have {self.train_x.shape[1]} pixels; seq_len must equal it")

    def make_batch(self, rng):
        idx = rng.integers(0, len(self.train_x), size=self.budget.batch_size)
        return self.train_x[idx].astype(np.int64), self.train_y[idx], None

    def evaluate(self, model):
        if not hasattr(self, "_eval_batches"):
            B = self.budget.batch_size
            n = min(len(self.test_x), self.budget.eval_batches * B)
            self._eval_batches = [to_torch((self.test_x[i:i + B].astype(np.int64), self.test_y[i:i + B], None))
                                  for i in range(0, n, B)]
        return evaluate(model, self._eval_batches)
