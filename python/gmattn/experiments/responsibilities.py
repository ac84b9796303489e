"""The responsibility analysis of a trained byte-level GMA language model (gmattn.analysis):
component usage, routing entropy, alignment of the arg-max component with byte classes
(normalised mutual information) and stability under small input perturbations, for the model
before training (its initialisation) and after, at every block, for queries and keys."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from . import report
from .commands import document
from .data import BYTE_CLASSES, byte_classes
from .runner import Recorder, Variant, run_one
from .tasks import ByteLM

NOISE_SCALES = (0.01, 0.1, 0.3)
"""Standard deviations of the input noise for routing_stability (absolute; the mixer's input comes
out of a LayerNorm, so its coordinates have unit scale)."""
METRICS = ("usage", "entropy", "nmi") + tuple(f"tv@{s:g}" for s in NOISE_SCALES)


def analyse(model, tokens, labels: np.ndarray) -> List[Dict[str, Any]]:
    """Per block and side (q, k): per-head usage, entropy, NMI with `labels`, and the mean
    total-variation distance under input noise of each NOISE_SCALES size."""
    from .. import analysis

    gammas = analysis.capture_responsibilities(model, tokens)
    inputs = analysis.capture_mixer_inputs(model, tokens)
    rows = []
    for block_index in sorted(gammas):
        mixer = model.blocks[block_index].mixer
        moved = {scale: analysis.routing_stability(mixer, inputs[block_index], scale) for scale in NOISE_SCALES}
        for side in ("q", "k"):
            stats = analysis.routing_stats(gammas[block_index][side], labels)
            row = {"block": int(block_index), "side": side}
            row.update({name: np.asarray(stats[name], dtype=np.float64).tolist() for name in ("usage", "entropy", "nmi")})
            row.update({f"tv@{scale:g}": np.asarray(moved[scale][side], dtype=np.float64).tolist()
                        for scale in NOISE_SCALES})
            rows.append(row)
    return rows


def run_analysis(task: ByteLM, seeds: Sequence[int], out: str, progress: bool, weights: str = None) -> Dict[str, Any]:
    import torch

    from ..mixers import read_weights

    variant = Variant("gma", "gma")
    recorder = Recorder(out, "analysis", task, seeds, [variant], {"noise_scales": list(NOISE_SCALES),
                                                                 "byte_classes": list(BYTE_CLASSES)})
    tokens = task.validation_batches()[0][0]
    labels = byte_classes(tokens.numpy())
    K = task.budget.num_components
    trained_models = {}
    for seed in seeds:
        initial = task.build("gma", seed)
        if weights:
            path = weights.format(seed=seed) if "{seed}" in weights else weights
            model = task.build("gma", seed).import_weights(read_weights(path))
            run = {"label": "gma", "kind": "gma", "seed": seed, "weights": os.path.basename(path),
                   "final": {f"val_{k}": v for k, v in task.evaluate(model).items()}}
        else:
            run, model = run_one(task, variant, seed, progress)
        model.eval()
        initial.eval()
        with torch.no_grad():
            run["analysis"] = {"initial": analyse(initial, tokens, labels), "trained": analyse(model, tokens, labels)}
        trained_models[seed] = model
        recorder.add(run)
    recorder.record["complete"] = True
    summary = summarise_analysis(recorder.runs)
    recorder.record["summary"] = summary
    recorder.save()
    plots = make_plots(recorder, trained_models[seeds[0]], tokens, seeds[0])
    table = analysis_table(summary)
    validation = report.spread([r["final"]["val_bits_per_byte"] for r in recorder.runs])
    text = [f"Validation bits/byte of the analysed models: {report.fmt(validation)}.\n",
            f"Responsibilities of the first validation batch ({tokens.shape[0]} x {tokens.shape[1]} bytes). "
            f"Usage: fraction of the K = {K} components whose mean responsibility exceeds 1/(4K); entropy in nats "
            f"(uniform routing: ln K = {math.log(K):.3f}); NMI: mutual information between the arg-max component "
            f"and the byte class ({', '.join(BYTE_CLASSES)}) over the class entropy; stability: mean total-"
            f"variation distance of the responsibilities under input noise. Each cell: mean over heads and seeds "
            f"± standard deviation over seeds (of the head means).\n", table]
    document(recorder, "Responsibilities of the byte-level GMA language model", task, seeds, text, plots)
    return summary


def summarise_analysis(runs) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{"<stage> block<b> <side>": {metric: spread over seeds of the head mean}}."""
    groups: Dict[str, Dict[str, List[float]]] = {}
    for run in runs:
        for stage, rows in run["analysis"].items():
            for row in rows:
                key = f"{stage} block {row['block']} {row['side']}"
                for metric in METRICS:
                    groups.setdefault(key, {}).setdefault(metric, []).append(float(np.mean(row[metric])))
    return {k: {m: report.spread(v) for m, v in ms.items()} for k, ms in groups.items()}


def analysis_table(summary) -> str:
    rows = []
    for key, stats in summary.items():
        stage, _, block, side = key.split(" ")
        rows.append([stage, block, side] + [report.fmt(stats[m]) for m in METRICS])
    header = ["model", "block", "side", "usage", "entropy (nats)", "NMI with byte class"]
    header += [f"TV under noise {s:g}" for s in NOISE_SCALES]
    return report.markdown_table(header, rows)


def make_plots(recorder: Recorder, model, tokens, seed: int) -> List[str]:
    """gmattn.analysis's plots of one trained model, for every block's queries: responsibilities of
    head 0 over the first characters of a validation window, usage per head, usage matrix."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from .. import analysis

    gammas = analysis.capture_responsibilities(model, tokens)
    text = bytes(tokens[0].tolist()).decode("latin-1")
    names = []
    for block_index in sorted(gammas):
        gamma = gammas[block_index]["q"]
        title = f"block {block_index} queries (seed {seed})"
        for name, fig in ((f"responsibilities_block{block_index}.png",
                           analysis.plot_responsibilities(gamma, text, head=0, max_chars=80,
                                                          title=f"{title}: responsibilities of head 0")),
                          (f"usage_block{block_index}.png", analysis.plot_component_usage(gamma, title=title)),
                          (f"usage_matrix_block{block_index}.png", analysis.plot_usage_matrix(gamma, title=title))):
            fig.savefig(recorder.path(name), dpi=72)
            plt.close(fig)
            names.append(name)
    return names
