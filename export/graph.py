"""The whole annotation model as one torch module, the shape the ONNX graph takes.

counts aligned to the gene order -> total counts to 1e4 and log1p (skipped when input_is_lognorm is 1)
-> merged encoder -> L2-normalised embedding -> head on the embedding and the log1p values of its marker genes
(divided by the calibration temperature) -> softmax; or, for a base model without a head (EncoderModel), the
embedding alone.

The choice between the two inputs is a torch.cond, exported as an ONNX If: only the branch taken runs. A
torch.where over both costs five passes over the dense [cells, 28231] input, which measured 45% of the fp32
model's time and 64% of int8's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scl.runtime.normalize import TARGET_SUM
from scl.train.head import CellHead


class AnnotationModel(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, head: CellHead):
        super().__init__()
        self.encoder = encoder.eval()
        self.head = head.eval()

    def forward(self, counts: torch.Tensor, input_is_lognorm: torch.Tensor):
        x = torch.cond(input_is_lognorm[0] > 0.5, _as_given, _lognorm, (counts,))
        embedding = self.encoder(x)  # SCimilarity's encoder ends with F.normalize
        probabilities = F.softmax(self.head(embedding, x), dim=1)
        return probabilities, embedding


class EncoderModel(torch.nn.Module):
    """A base model without a head (scl-pretrain's folder, or SCimilarity's own weights): counts -> embedding only,
    for annotation by a reference's nearest cells."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder.eval()

    def forward(self, counts: torch.Tensor, input_is_lognorm: torch.Tensor):
        return self.encoder(torch.cond(input_is_lognorm[0] > 0.5, _as_given, _lognorm, (counts,)))


def annotation_model(run) -> AnnotationModel:
    """A trained run (train/run_dir.TrainedRun) as the module scl-export writes: its head divided by the run's
    calibration temperature (1 for runs from before calibration)."""
    temperature = run.calibration.temperature if run.calibration is not None else 1.0
    return AnnotationModel(run.model.encoder, temperature_scaled(run.head, temperature)).eval()


def temperature_scaled(head: CellHead, temperature: float) -> CellHead:
    """The head with its logits divided by the temperature, folded into its weights: calibrated probabilities
    come out of the graph itself, with no extra node and the same labels."""
    return head.scaled(1.0 / temperature)


def _lognorm(counts: torch.Tensor) -> torch.Tensor:
    scale = TARGET_SUM / counts.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.log1p(counts * scale)


def _as_given(x: torch.Tensor) -> torch.Tensor:
    return x.clone()  # torch.cond's branches may not return an input itself
