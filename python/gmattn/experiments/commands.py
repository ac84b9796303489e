"""The comparison experiments: lm, mqar, listops, fashion_mnist. Each runs every kind at the same
budget and seeds and writes results.json, <name>.md (tables: mean ± standard deviation over
seeds) and learning-curve plots into its output folder."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from . import report
from .runner import Recorder, Variant, kind_variants, run_variants
from .tasks import MQAR, ByteLM, FashionMNIST, ListOps, Task


def budget_line(task: Task, seeds: Sequence[int]) -> str:
    b = task.budget
    return (f"Budget (every row alike): d_model {b.d_model}, {b.num_layers} layers, {b.num_heads} heads, "
            f"K = {b.num_components} (gma), sequence length {b.seq_len}, batch {b.batch_size}, {b.steps} steps of "
            f"AdamW (lr {b.lr:g}, warm-up {b.warmup}, cosine to lr/10, weight decay {b.weight_decay:g}, "
            f"clip {b.clip:g}), seeds {', '.join(map(str, seeds))}.")


def final(metric: str):
    return lambda run: run["final"].get(metric, float("nan"))


def label(run: Dict[str, Any]) -> str:
    return run["label"]


def document(recorder: Recorder, title: str, task: Task, seeds: Sequence[int], sections: List[str],
             plots: List[str]) -> str:
    """<experiment>.md: title, command, budget, the tables, the plots."""
    env = recorder.record["environment"]
    text = [f"# {title}\n", f"`{env['command']}` ({env['utc']} UTC, torch {env['torch']}, {env['threads']} thread)\n",
            budget_line(task, seeds) + "\n"]
    if not recorder.record["complete"]:
        text.append("**Incomplete: not every run finished.**\n")
    text += sections
    text += [f"![{p}]({p})\n" for p in plots if p]
    body = "\n".join(text)
    report.write_text(recorder.path(f"{recorder.record['experiment']}.md"), body)
    return body


def curves(recorder: Recorder, name: str, metric, ylabel: str, title: str, runs=None) -> str:
    path = report.plot_curves(recorder.path(name), runs if runs is not None else recorder.runs, label, metric,
                              ylabel, title)
    return name if path else ""


# ----------------------------------------------------------------------------------------------
def classification_summary(recorder: Recorder, task: Task, seeds, title: str) -> Dict[str, Any]:
    summary = report.summarise(recorder.runs, label, {
        "parameters": lambda r: r["parameters"], "accuracy": final("val_accuracy"), "loss": final("val_loss"),
        "seconds": lambda r: r["seconds"]})
    recorder.record["summary"] = summary
    recorder.save()
    table = report.summary_table(summary, "kind", [("accuracy", "test accuracy", 3), ("loss", "test loss", 3),
                                                   ("parameters", "parameters", 0), ("seconds", "train s", 0)])
    plots = [curves(recorder, "curves.png", lambda p: p["val_accuracy"], "test accuracy", title)]
    document(recorder, title, task, seeds, [table], plots)
    return summary


def run_listops(task: ListOps, kinds, seeds, out, progress, resume=False) -> Dict[str, Any]:
    recorder = Recorder(out, "listops", task, seeds, kind_variants(kinds), resume=resume)
    run_variants(task, kind_variants(kinds), seeds, recorder, progress)
    return classification_summary(
        recorder, task, seeds, f"ListOps ({task.min_length}-{task.max_length} tokens): test accuracy")


def run_fashion_mnist(task: FashionMNIST, kinds, seeds, out, progress, resume=False) -> Dict[str, Any]:
    recorder = Recorder(out, "fashion_mnist", task, seeds, kind_variants(kinds), resume=resume)
    run_variants(task, kind_variants(kinds), seeds, recorder, progress)
    return classification_summary(recorder, task, seeds, "Fashion-MNIST as 784-pixel sequences: test accuracy")


# ----------------------------------------------------------------------------------------------
def lm_summary(recorder: Recorder, first_column: str = "kind") -> str:
    summary = report.summarise(recorder.runs, label, {
        "parameters": lambda r: r["parameters"], "bits_per_byte": final("val_bits_per_byte"),
        "accuracy": final("val_accuracy"), "seconds": lambda r: r["seconds"]})
    recorder.record["summary"] = summary
    recorder.save()
    return report.summary_table(summary, first_column, [
        ("bits_per_byte", "validation bits/byte", 3), ("accuracy", "next-byte accuracy", 3),
        ("parameters", "parameters", 0), ("seconds", "train s", 0)])


def run_lm(task: ByteLM, kinds, seeds, out, progress, resume=False) -> Dict[str, Any]:
    recorder = Recorder(out, "lm", task, seeds, kind_variants(kinds), resume=resume)
    run_variants(task, kind_variants(kinds), seeds, recorder, progress)
    table = lm_summary(recorder)
    title = "Byte-level causal LM on Shakespeare: validation bits per byte"
    plots = [curves(recorder, "curves.png", lambda p: p["val_bits_per_byte"], "validation bits/byte", title)]
    document(recorder, title, task, seeds, [table], plots)
    return recorder.record["summary"]


# ----------------------------------------------------------------------------------------------
def mqar_table(recorder: Recorder, task: MQAR, runs, first_column: str):
    metrics = {"accuracy": final("val_accuracy")}
    metrics.update({f"pairs_{p}": final(f"val_accuracy_{p}") for p in task.pair_counts})
    metrics["seconds"] = lambda r: r["seconds"]
    summary = report.summarise(runs, label, metrics)
    columns = [("accuracy", "accuracy (all)", 3)] + [(f"pairs_{p}", f"{p} pairs", 3) for p in task.pair_counts]
    columns.append(("seconds", "train s", 0))
    return summary, report.summary_table(summary, first_column, columns)


def accuracy_vs_pairs(recorder: Recorder, task: MQAR, summary, name: str, title: str) -> str:
    series = {g: [s[f"pairs_{p}"] for p in task.pair_counts] for g, s in summary.items()}
    path = report.plot_lines(recorder.path(name), task.pair_counts, series, "key-value pairs", "recall accuracy",
                             title, logx=True)
    return name if path else ""


def mqar_variants(kinds, k_values, default_k: int) -> List[Variant]:
    variants = kind_variants(kinds)
    variants += [Variant(f"gma K={k}", "gma", {"num_components": k}) for k in k_values if k != default_k]
    return variants


def run_mqar(task: MQAR, kinds, k_values, seeds, out, progress, resume=False) -> Dict[str, Any]:
    """Every kind at the default K, then gma at each K of k_values; accuracy per number of pairs."""
    default_k = task.budget.num_components
    variants = mqar_variants(kinds, k_values if "gma" in kinds else (), default_k)
    recorder = Recorder(out, "mqar", task, seeds, variants, {"k_values": list(k_values)}, resume=resume)
    run_variants(task, variants, seeds, recorder, progress)
    kind_runs = [r for r in recorder.runs if r["label"] in kinds]
    k_runs = [dict(r, label=f"K={r['label'].split('=')[1] if '=' in r['label'] else default_k}")
              for r in recorder.runs if r["kind"] == "gma"]
    k_runs.sort(key=lambda r: int(r["label"][2:]))
    kinds_summary, kinds_table = mqar_table(recorder, task, kind_runs, "kind")
    k_summary, k_table = mqar_table(recorder, task, k_runs, "gma")
    recorder.record["summary"] = {"kinds": kinds_summary, "components": k_summary}
    recorder.save()
    title = f"MQAR (sequence length {task.budget.seq_len}): recall accuracy"
    plots = [accuracy_vs_pairs(recorder, task, kinds_summary, "accuracy_vs_pairs.png", title + " by kind"),
             accuracy_vs_pairs(recorder, task, k_summary, "accuracy_vs_k.png", title + " of gma by K")
             if len(k_summary) > 1 else "",
             curves(recorder, "curves.png", lambda p: p["val_accuracy"], "recall accuracy (all pair counts)", title,
                    runs=kind_runs)]
    sections = ["## By kind\n", kinds_table, "## gma by number of components K\n", k_table] if len(k_summary) > 1 \
        else ["## By kind\n", kinds_table]
    document(recorder, title, task, seeds, sections, plots)
    return recorder.record["summary"]
