"""The whole annotation model as one torch module, the shape the ONNX graph takes.

counts aligned to the gene order -> total counts to 1e4 and log1p (skipped when input_is_lognorm is 1)
-> merged encoder -> L2-normalised embedding -> linear head -> softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scl.runtime.normalize import TARGET_SUM


class AnnotationModel(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.encoder = encoder.eval()
        self.head = head.eval()

    def forward(self, counts: torch.Tensor, input_is_lognorm: torch.Tensor):
        totals = counts.sum(dim=1, keepdim=True).clamp_min(1e-12)
        normalised = torch.log1p(counts / totals * TARGET_SUM)
        x = torch.where(input_is_lognorm > 0.5, counts, normalised)
        embedding = self.encoder(x)  # SCimilarity's encoder ends with F.normalize
        probabilities = F.softmax(self.head(embedding), dim=1)
        return probabilities, embedding
