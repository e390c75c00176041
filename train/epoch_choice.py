"""Which epoch's weights scl-train keeps, and when it stops.

The best epoch is the one with the highest validation macro-F1, ties broken by the lower validation loss: macro-F1
saturates (1.000 for several epochs on an easy validation set) while the loss still orders them. Training stops once
`patience` epochs in a row bring no better epoch, so --epochs is a maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TIE = 1e-9  # macro-F1 values closer than this are equal


def log_loss(probabilities: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the true classes (what the head minimises), clipped so one sure mistake stays finite."""
    return float(-np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-12, None)).mean())


@dataclass
class EpochChoice:
    patience: int
    macro_f1: float = -math.inf
    loss: float = math.inf
    epoch: int = 0
    state: dict | None = None

    def offer(self, epoch: int, macro_f1: float, loss: float, state) -> bool:
        """Keep `state()` if this epoch is the best so far; True when training should stop."""
        if macro_f1 > self.macro_f1 + TIE or (macro_f1 > self.macro_f1 - TIE and loss < self.loss):
            self.macro_f1, self.loss, self.epoch, self.state = macro_f1, loss, epoch, state()
        return epoch - self.epoch >= self.patience


def epoch_line(epochs: dict) -> str:
    """What the epochs run say, for the summary and report.md: stopped early, or still improving at the last."""
    best, run, most, patience = epochs["best"], epochs["run"], epochs["max"], epochs["patience"]
    if run < most:
        return f"epochs: stopped early after {run} of at most {most} (no better validation for {patience}); kept epoch {best}"
    if best == run:
        return (f"epochs: the best was the last of {most}, so validation was still improving: train longer "
                f"(--epochs {2 * most}; early stopping ends it when it plateaus)")
    return f"epochs: kept epoch {best} of {most}"
