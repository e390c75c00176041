"""Where training runs: CUDA (with bf16 autocast) when there is one, else the CPU."""

from __future__ import annotations

import contextlib

import torch

from scl.runtime.errors import SclError


def seed_everything(seed: int) -> None:
    """The same seed gives the same model, bit for bit. On 2 CPU threads some kernels added up in a varying order (the
    demo's pretraining losses parted in the 5th decimal by epoch 3); torch's deterministic kernels cost no measurable
    time there. warn_only: on CUDA, ops without a deterministic kernel warn rather than stop training."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(wanted: str) -> torch.device:
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise SclError("--device cuda was asked for but torch sees no CUDA GPU here; use --device cpu or auto.")
    if wanted not in ("cpu", "cuda"):
        raise SclError(f"--device {wanted!r}: choose auto, cpu or cuda.")
    return torch.device(wanted)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
