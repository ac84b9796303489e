"""What makes GMA learn well: gma variants on the LM or MQAR task at the comparison's budget.

Each variant changes one thing from the library's defaults: K, routing_dim, the variance or mean
initialisation, the prior, the learning rate of mu / omega / alpha, normalised routing coordinates.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from . import report
from .commands import curves, document, final, label, lm_summary, mqar_table
from .gma_options import GMAOptions
from .runner import Recorder, Variant, run_variants
from .tasks import Task
from .training import Budget

DEFAULT_LABEL = "defaults"


def ablation_variants(budget: Budget) -> List[Variant]:
    """The variants, each one change from the defaults (first row: the defaults themselves)."""
    head_dim = budget.d_model // budget.num_heads
    K = budget.num_components
    return [
        Variant(DEFAULT_LABEL, "gma"),
        Variant(f"K={K // 4}", "gma", {"num_components": max(1, K // 4)}),
        Variant(f"K={K * 4}", "gma", {"num_components": K * 4}),
        Variant(f"routing_dim={max(1, head_dim // 2)}", "gma", {"routing_dim": max(1, head_dim // 2)}),
        Variant(f"routing_dim={head_dim * 2}", "gma", {"routing_dim": head_dim * 2}),
        Variant("variance init x0.25", "gma", options=GMAOptions(variance_scale=0.25)),
        Variant("variance init x4", "gma", options=GMAOptions(variance_scale=4.0)),
        Variant("mean init x0.3", "gma", options=GMAOptions(mean_scale=0.3)),
        Variant("means from data", "gma", options=GMAOptions(mean_init="data")),
        Variant("uniform prior (fixed)", "gma", options=GMAOptions(prior="uniform")),
        Variant("mixture lr x0.3", "gma", options=GMAOptions(mixture_lr_mult=0.3)),
        Variant("mixture lr x10", "gma", options=GMAOptions(mixture_lr_mult=10.0)),
        Variant("normalised routing", "gma", options=GMAOptions(routing_norm=True)),
    ]


def select(variants: Sequence[Variant], names: Optional[Sequence[str]]) -> List[Variant]:
    if not names:
        return list(variants)
    known = {v.label: v for v in variants}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"ablate: unknown variants {unknown}; known are {list(known)}")
    return [known[n] for n in names]


def delta_column(summary: Dict[str, Dict[str, Dict[str, float]]], metric: str, digits: int) -> Dict[str, str]:
    """Each variant's mean minus the defaults' mean (empty without a defaults row)."""
    base = summary.get(DEFAULT_LABEL, {}).get(metric)
    if base is None or base["n"] == 0:
        return {g: "" for g in summary}
    return {g: (f"{s[metric]['mean'] - base['mean']:+.{digits}f}" if s[metric]["n"] else "") for g, s in summary.items()}


def with_delta(table: str, deltas: Dict[str, str], heading: str) -> str:
    """Appends a column to a Markdown table from summary_table (rows in the summary's order)."""
    lines = table.rstrip("\n").split("\n")
    out = [lines[0] + f" {heading} |", lines[1] + " --- |"]
    out += [line + f" {delta} |" for line, delta in zip(lines[2:], deltas.values())]
    return "\n".join(out) + "\n"


def run_ablation(task: Task, task_name: str, seeds, out, progress, names=None, resume=False) -> Dict[str, Any]:
    variants = select(ablation_variants(task.budget), names)
    recorder = Recorder(out, f"ablate_{task_name}", task, seeds, variants, resume=resume)
    run_variants(task, variants, seeds, recorder, progress)
    if task_name == "lm":
        table = lm_summary(recorder, "gma variant")
        summary = recorder.record["summary"]
        table = with_delta(table, delta_column(summary, "bits_per_byte", 3), "Δ bits/byte vs defaults")
        metric, ylabel = (lambda p: p["val_bits_per_byte"]), "validation bits/byte"
    else:
        summary, table = mqar_table(recorder, task, recorder.runs, "gma variant")
        recorder.record["summary"] = summary
        recorder.save()
        table = with_delta(table, delta_column(summary, "accuracy", 3), "Δ accuracy vs defaults")
        metric, ylabel = (lambda p: p["val_accuracy"]), "recall accuracy"
    title = f"GMA ablation on {task_name}"
    plots = [curves(recorder, "curves.png", metric, ylabel, title)]
    document(recorder, title, task, seeds, [table], plots)
    return summary
