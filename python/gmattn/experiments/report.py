"""Results of an experiment: the JSON record, Markdown tables (mean ± spread over seeds) and
learning-curve plots."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count of finite values;
    `nonfinite` counts the rest (diverged runs), which never enter the statistics."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0,
                "nonfinite": int(arr.size)}
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
            "min": float(finite.min()), "max": float(finite.max()), "n": int(finite.size),
            "nonfinite": int(arr.size - finite.size)}


def summarise(runs: Sequence[Dict[str, Any]], key: Callable[[Dict[str, Any]], str],
              metrics: Dict[str, Callable[[Dict[str, Any]], float]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{group: {metric: spread over the group's runs}}, groups in first-seen order."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return {g: {m: spread([f(r) for r in rs]) for m, f in metrics.items()} for g, rs in groups.items()}


def fmt(stat: Dict[str, float], digits: int = 3) -> str:
    """'mean ± std' (the spread over seeds), with the count of diverged runs if any."""
    if stat["n"] == 0:
        return "diverged"
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if stat.get("nonfinite"):
        text += f" ({stat['nonfinite']} diverged)"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_table(summary: Dict[str, Dict[str, Dict[str, float]]], first_column: str,
                  columns: Sequence[Tuple[str, str, int]]) -> str:
    """A Markdown table of `summary`: one row per group with its number of runs (seeds), then
    columns (metric, heading, digits)."""
    header = [first_column, "seeds"] + [heading for _, heading, _ in columns]
    first = columns[0][0]
    rows = [[group, str(stats[first]["n"] + stats[first]["nonfinite"])] + [fmt(stats[m], d) for m, _, d in columns]
            for group, stats in summary.items()]
    return markdown_table(header, rows)


def environment() -> Dict[str, Any]:
    import torch

    from .. import __version__ as gmattn_version

    return {"command": " ".join([os.path.basename(sys.executable), "-m", "gmattn.experiments"] + sys.argv[1:]),
            "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__, "gmattn": gmattn_version, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _clean(obj):
    """JSON-safe: NaN/inf become null (strict JSON has no NaN), NumPy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def write_json(path: str, record: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(_clean(record), f, indent=1, allow_nan=False)
        f.write("\n")


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _pyplot():
    """matplotlib.pyplot with a file backend, or None without matplotlib (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _finish(plt, fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> str:
    """Labels, grid and legend; writes the PNG (small: 90 dpi) and closes the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_curves(path: str, runs: Sequence[Dict[str, Any]], key: Callable[[Dict[str, Any]], str],
                metric: Callable[[Dict[str, Any]], float], ylabel: str, title: str,
                logy: bool = False) -> Optional[str]:
    """Learning curves: for each group the mean over its runs (seeds) against the step, shaded
    between the smallest and largest run. Returns the path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, rs in groups.items():
        steps = [p["step"] for p in rs[0]["curve"]]
        length = min(len(r["curve"]) for r in rs)
        values = np.array([[metric(p) for p in r["curve"][:length]] for r in rs], dtype=np.float64)
        x = steps[:length]
        line, = ax.plot(x, np.nanmean(values, 0), label=name, lw=1.6)
        if len(rs) > 1:
            ax.fill_between(x, np.nanmin(values, 0), np.nanmax(values, 0), color=line.get_color(), alpha=0.18, lw=0)
    if logy:
        ax.set_yscale("log")
    return _finish(plt, fig, ax, path, "training step", ylabel, title)


def plot_lines(path: str, x: Sequence[float], series: Dict[str, Sequence[Dict[str, float]]], xlabel: str,
               ylabel: str, title: str, logx: bool = False) -> Optional[str]:
    """One line per series: mean over seeds at each x with error bars of the standard deviation."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, stats in series.items():
        ax.errorbar(x, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], label=name, marker="o",
                    ms=3.5, lw=1.5, capsize=3)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{v:g}" for v in x])
    return _finish(plt, fig, ax, path, xlabel, ylabel, title)
