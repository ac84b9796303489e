"""Runs variants (a kind, its config changes and GMA options) over seeds on a task, saving the
record after every run so an interrupted experiment keeps what finished."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import report
from .gma_options import GMAOptions, apply_gma_options
from .tasks import Task
from .training import count_parameters, train


def experiment_kinds() -> Tuple[str, ...]:
    """Every mixer kind the library builds (the comparisons run all of them by default)."""
    from ..mixers import KINDS

    return tuple(KINDS)


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: `label`, the mixer `kind`, MixerConfig field changes and (GMA
    only) GMAOptions."""

    label: str
    kind: str
    config: Dict[str, Any] = field(default_factory=dict)
    options: Optional[GMAOptions] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "config": dict(self.config),
                "options": self.options.to_dict() if self.options else None}


def kind_variants(kinds: Sequence[str]) -> List[Variant]:
    return [Variant(kind, kind) for kind in kinds]


def run_one(task: Task, variant: Variant, seed: int, progress: bool = True):
    """Builds, (re-)initialises and trains one model; returns (run record, trained model)."""
    if variant.options is not None and variant.kind != "gma":
        raise ValueError(f"Variant {variant.label!r}: GMA options apply to kind 'gma' only, not {variant.kind!r}")
    model = task.build(variant.kind, seed, **variant.config)
    options = variant.options or GMAOptions()
    if variant.options is not None:
        apply_gma_options(model, options, task.init_batch() if options.mean_init == "data" else None)
    result = train(model, task.train_stream(seed), task.evaluate, task.budget, mixture_lr_mult=options.mixture_lr_mult,
                   desc=f"{variant.label} seed {seed}", progress=progress)
    run = {"label": variant.label, "kind": variant.kind, "seed": seed, "parameters": count_parameters(model), **result}
    return run, model


class Recorder:
    """The experiment's record (results.json in `out`), rewritten after every run."""

    def __init__(self, out: str, experiment: str, task: Task, seeds: Sequence[int], variants: Sequence[Variant],
                 extra: Optional[Dict[str, Any]] = None, resume=False):
        """resume: False (start afresh), True (keep the finished runs of an earlier identical
        record in `out`, run the rest) or "report" (keep them and run nothing: only the tables
        and plots are written again)."""
        os.makedirs(out, exist_ok=True)
        self.out = out
        self.record: Dict[str, Any] = {
            "experiment": experiment, "environment": report.environment(), "budget": task.budget.to_dict(),
            "task": task.describe(), "seeds": list(seeds), "variants": [v.to_dict() for v in variants],
            **(extra or {}), "complete": False, "runs": [],
        }
        self.report_only = resume == "report"
        if resume:
            self.record["runs"] = self._finished_runs(variants)

    def _finished_runs(self, variants: Sequence[Variant]) -> List[Dict[str, Any]]:
        """The runs of an earlier record in `out` that this one would repeat exactly (same
        experiment, budget, task and variant definition); an error if the setups differ."""
        path = self.path("results.json")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            old = json.load(f)
        for key in ("experiment", "budget", "task"):
            if old.get(key) != json.loads(json.dumps(self.record[key])):
                raise ValueError(f"--resume: {path} has a different {key}; use another --out or drop --resume")
        same = {v["label"] for v in old.get("variants", [])} & {v.label for v in variants}
        definitions = {v["label"]: v for v in old["variants"]}
        keep = {v.label for v in variants if v.label in same and definitions[v.label] == v.to_dict()}
        return [r for r in old.get("runs", []) if r["label"] in keep]

    def done(self, variant: "Variant", seed: int) -> bool:
        return any(r["label"] == variant.label and r["seed"] == seed for r in self.runs)

    @property
    def runs(self) -> List[Dict[str, Any]]:
        return self.record["runs"]

    def add(self, run: Dict[str, Any]) -> None:
        self.runs.append(run)
        self.save()

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def save(self) -> None:
        report.write_json(self.path("results.json"), self.record)


def run_variants(task: Task, variants: Sequence[Variant], seeds: Sequence[int], recorder: Recorder,
                 progress: bool = True) -> List[Dict[str, Any]]:
    """Every variant at every seed, seed by seed (a run cut short still has whole seeds)."""
    from .training import iterate

    jobs = [(seed, v) for seed in seeds for v in variants if not recorder.done(v, seed)]
    for seed, variant in iterate([] if recorder.report_only else jobs, f"{recorder.record['experiment']}", progress):
        run, _ = run_one(task, variant, seed, progress)
        recorder.add(run)
    recorder.record["complete"] = all(recorder.done(v, seed) for seed in seeds for v in variants)
    recorder.save()
    return recorder.runs
