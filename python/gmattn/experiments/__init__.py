"""Experiments comparing the mixer kinds at equal budgets, one command each:

    python -m gmattn.experiments lm             # byte-level causal LM on Shakespeare
    python -m gmattn.experiments mqar           # multi-query associative recall, by pairs and by K
    python -m gmattn.experiments listops        # ListOps classification (LRA's grammar)
    python -m gmattn.experiments fashion_mnist  # Fashion-MNIST as 784-pixel sequences
    python -m gmattn.experiments analysis       # GMA's responsibilities in the trained LM
    python -m gmattn.experiments ablate --task lm|mqar   # what makes GMA learn well

Add --quick for a tiny run, --seeds, --out DIR, --kinds. Every kind trains with the same width,
depth, steps, learning rate, data order and seeds. See docs/experiments.md.
"""

from __future__ import annotations

from .cli import EXPERIMENTS

__all__ = ["EXPERIMENTS"]
