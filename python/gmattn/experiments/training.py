"""The training loop every experiment shares: equal budgets, seeds and data order for every kind.

Every kind trains with the same optimiser (AdamW, linear warm-up then cosine decay, gradient
clipping), the same learning rate and the same batches: the data stream is drawn from a NumPy
generator seeded by the run's seed alone, and the model's initialisation from torch's generator
seeded the same way, so two kinds with the same seed see identical examples in identical order.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

IGNORE = -100
"""Target value of positions that carry no loss (padding, MQAR's non-query positions)."""

MIXTURE_PARAMETERS = ("mu", "omega", "alpha")
"""Names (last path component) of GMA's mixture parameters: means, raw variances, prior logits."""


@dataclass(frozen=True)
class Budget:
    """Model size and training budget of one run; identical for every kind of a comparison."""

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_components: int = 32
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8

    def replace(self, **changes) -> "Budget":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


Batch = Tuple[Any, Any, Optional[Any]]
"""(tokens (B, N) int64, targets (B, N) or (B,) int64 with IGNORE where no loss, key_padding_mask or None)."""


def seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def to_torch(batch) -> Batch:
    """A NumPy (tokens, targets, mask) triple as torch tensors."""
    import torch

    tokens, targets, mask = batch
    return (torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)),
            None if mask is None else torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)))


def is_mixture_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in MIXTURE_PARAMETERS


def parameter_groups(model, lr: float, weight_decay: float, mixture_lr_mult: float = 1.0) -> List[Dict[str, Any]]:
    """AdamW groups: matrices with weight decay; biases, norms and embeddings without; GMA's
    mixture parameters (mu, omega, alpha) without decay at lr * mixture_lr_mult."""
    decay, plain, mixture = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_mixture_parameter(name):
            mixture.append(p)
        elif p.ndim >= 2 and "embed" not in name:
            decay.append(p)
        else:
            plain.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0}]
    if mixture:
        groups.append({"params": mixture, "weight_decay": 0.0, "lr_scale": mixture_lr_mult})
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, budget: Budget) -> float:
    """Linear warm-up over budget.warmup steps, then cosine decay to a tenth of the peak."""
    if step < budget.warmup:
        return (step + 1) / budget.warmup
    progress = (step - budget.warmup) / max(1, budget.steps - budget.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def loss_and_correct(model, batch: Batch):
    """Summed cross-entropy, number of correct arg-max predictions and of scored targets."""
    import torch.nn.functional as F

    tokens, targets, mask = batch
    logits = model(tokens, key_padding_mask=mask) if mask is not None else model(tokens)
    logits = logits.reshape(-1, logits.shape[-1])
    flat = targets.reshape(-1)
    loss = F.cross_entropy(logits.float(), flat, ignore_index=IGNORE, reduction="sum")
    scored = flat != IGNORE
    correct = (logits.argmax(-1) == flat)[scored].sum()
    return loss, correct, scored.sum()


def evaluate(model, batches: Sequence[Batch]) -> Dict[str, float]:
    """Mean cross-entropy (nats per scored target) and accuracy over fixed batches."""
    return evaluate_groups(model, {"": batches})


def evaluate_groups(model, groups: Dict[str, Sequence[Batch]]) -> Dict[str, float]:
    """"loss" and "accuracy" over all groups' batches together, and with more than one group
    "accuracy_<group>" of each group."""
    import torch

    was_training = model.training
    model.eval()
    sums = {}
    with torch.no_grad():
        for name, batches in groups.items():
            loss_sum, correct_sum, count = 0.0, 0, 0
            for batch in batches:
                loss, correct, n = loss_and_correct(model, batch)
                loss_sum, correct_sum, count = loss_sum + float(loss), correct_sum + int(correct), count + int(n)
            sums[name] = (loss_sum, correct_sum, count)
    model.train(was_training)
    total = max(sum(c for _, _, c in sums.values()), 1)
    out = {"loss": sum(s for s, _, _ in sums.values()) / total,
           "accuracy": sum(c for _, c, _ in sums.values()) / total}
    if len(groups) > 1:
        out.update({f"accuracy_{name}": c / max(n, 1) for name, (_, c, n) in sums.items()})
    return out


def train(model, next_batch: Callable[[int], Batch], evaluate_model: Callable[[Any], Dict[str, float]],
          budget: Budget, *, mixture_lr_mult: float = 1.0, desc: str = "", progress: bool = True) -> Dict[str, Any]:
    """Trains `model` for budget.steps steps on next_batch(step); evaluate_model(model) (at least
    "loss" and "accuracy") runs every budget.eval_every steps and at the end.

    Returns {"curve": [{"step", "train_loss", "val_loss", "val_accuracy", ...}], "final": the last
    evaluation, "seconds": wall time of training (evaluations excluded), "diverged": whether a
    training loss went non-finite (training stops there)}.
    """
    import torch

    optimiser = torch.optim.AdamW(parameter_groups(model, budget.lr, budget.weight_decay, mixture_lr_mult),
                                  betas=(0.9, 0.98))
    params = [p for p in model.parameters() if p.requires_grad]
    curve: List[Dict[str, float]] = []
    running, running_n = 0.0, 0
    diverged = False

    eval_seconds = 0.0

    def record(step: int) -> Dict[str, float]:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        metrics = {f"val_{k}": v for k, v in evaluate_model(model).items()}
        eval_seconds += time.perf_counter() - t0
        point = {"step": step, "train_loss": running / running_n if running_n else float("nan"), **metrics}
        curve.append(point)
        return point

    bar = _progress(budget.steps, desc, progress)
    model.train()
    start = time.perf_counter()
    steps_done = 0
    for step in range(budget.steps):
        for g in optimiser.param_groups:
            g["lr"] = budget.lr * g["lr_scale"] * lr_factor(step, budget)
        loss_sum, _, n = loss_and_correct(model, next_batch(step))
        loss = loss_sum / n.clamp_min(1)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if budget.clip:
            torch.nn.utils.clip_grad_norm_(params, budget.clip)
        optimiser.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = True
            break
        running += value
        running_n += 1
        steps_done = step + 1
        if (step + 1) % budget.eval_every == 0 and step + 1 < budget.steps:
            point = record(step + 1)
            running, running_n = 0.0, 0
            bar.set_postfix(val_loss=f"{point['val_loss']:.3f}", acc=f"{point['val_accuracy']:.3f}")
        bar.update(1)
    final = record(steps_done)
    seconds = time.perf_counter() - start - eval_seconds
    bar.close()
    return {"curve": curve, "final": final, "seconds": seconds, "diverged": diverged}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def build_model(kind: str, budget: Budget, *, vocab_size: int, causal: bool, seed: int, head: str = "lm",
                num_classes: Optional[int] = None, pooling: str = "mean", max_len: Optional[int] = None,
                **config_overrides):
    """A torch SequenceModel of `kind` at the budget's width and depth, initialised from `seed`."""
    from ..mixers import MixerConfig, build_model as build

    seed_everything(seed)
    fields = dict(kind=kind, d_model=budget.d_model, num_heads=budget.num_heads, causal=causal,
                  num_components=budget.num_components, seed=seed)
    config = MixerConfig(**{**fields, **config_overrides})
    return build(config, framework="torch", vocab_size=vocab_size, num_layers=budget.num_layers, head=head,
                 num_classes=num_classes, pooling=pooling, max_len=max_len)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batches_from(make: Callable[[np.random.Generator], Any], seed: int) -> Callable[[int], Batch]:
    """next_batch(step) drawing from one generator seeded by `seed` alone (the same stream for
    every kind); steps must be asked for in order."""
    rng = np.random.default_rng(seed)

    def next_batch(step: int) -> Batch:
        return to_torch(make(rng))

    return next_batch


def fixed_batches(make: Callable[[np.random.Generator], Any], count: int, seed: int) -> List[Batch]:
    rng = np.random.default_rng(seed)
    return [to_torch(make(rng)) for _ in range(count)]


def iterate(items: Iterable, desc: str, progress: bool):
    """tqdm over `items` when progress is on (and tqdm installed), the items otherwise."""
    if not progress:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, dynamic_ncols=True)
