"""The experiment commands behind `python -m gmattn.experiments NAME` (args from __main__)."""

from __future__ import annotations

from typing import Callable, Dict

from .ablate import run_ablation
from .commands import run_fashion_mnist, run_listops, run_lm, run_mqar
from .responsibilities import run_analysis
from .runner import experiment_kinds
from .tasks import MQAR, ByteLM, FashionMNIST, ListOps, Task

BUDGET_FIELDS = ("steps", "batch_size", "seq_len", "d_model", "num_layers", "num_heads", "num_components", "lr",
                 "eval_every", "eval_batches")
MQAR_PAIRS = (1, 2, 4, 8)
MQAR_PAIRS_QUICK = (2, 4)
MQAR_K_VALUES = (8, 32, 128)
MQAR_K_VALUES_QUICK = (2, 4)


def budget(task_class, args):
    """The task's default (or --quick) budget with the command line's overrides."""
    base = task_class.quick_budget if args.quick else task_class.default_budget
    return base.replace(**{f: getattr(args, f, None) for f in BUDGET_FIELDS})


def kinds(args):
    available = experiment_kinds()
    if not args.kinds:
        return available
    chosen = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in available]
    if unknown:
        raise ValueError(f"--kinds: unknown kinds {unknown}; available are {list(available)}")
    return tuple(chosen)


def progress(args) -> bool:
    return not args.no_progress


def lm_task(args) -> ByteLM:
    return ByteLM(budget(ByteLM, args), args.data)


def mqar_task(args) -> MQAR:
    pairs = args.pairs or (MQAR_PAIRS_QUICK if args.quick else MQAR_PAIRS)
    return MQAR(budget(MQAR, args), pairs)


def lm(args):
    return run_lm(lm_task(args), kinds(args), args.seeds, args.out, progress(args), args.resume)


def mqar(args):
    k_values = args.k_values or (MQAR_K_VALUES_QUICK if args.quick else MQAR_K_VALUES)
    return run_mqar(mqar_task(args), kinds(args), k_values, args.seeds, args.out, progress(args), args.resume)


def listops(args):
    task = ListOps(budget(ListOps, args), args.min_length)
    return run_listops(task, kinds(args), args.seeds, args.out, progress(args), args.resume)


def fashion_mnist(args):
    task = FashionMNIST(budget(FashionMNIST, args), args.data)
    return run_fashion_mnist(task, kinds(args), args.seeds, args.out, progress(args), args.resume)


def ablate(args):
    task: Task = lm_task(args) if args.task == "lm" else mqar_task(args)
    names = [n.strip() for n in args.variants.split(",")] if args.variants else None
    return run_ablation(task, args.task, args.seeds, args.out, progress(args), names, args.resume)


def analysis(args):
    if args.resume:
        raise ValueError("analysis trains and analyses in one go: --resume and --report-only do not apply")
    return run_analysis(lm_task(args), args.seeds, args.out, progress(args), args.weights)


EXPERIMENTS: Dict[str, Callable] = {"lm": lm, "mqar": mqar, "listops": listops, "fashion_mnist": fashion_mnist,
                                    "analysis": analysis, "ablate": ablate}
