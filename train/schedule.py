"""The learning-rate schedule of fine-tuning: constant, or one epoch of linear warm-up then cosine decay.

The cosine runs over the most epochs (--epochs): a run that stops early on a plateau ends part-way down it.
"""

from __future__ import annotations

import math

import torch


def lr_schedule(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR to step after every optimiser step; it scales every parameter group alike."""
    total, warm = max(epochs * steps_per_epoch, 1), max(steps_per_epoch, 1)

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, total - warm) / max(total - warm, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
