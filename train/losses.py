"""Triplet losses on L2-normalised embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def semihard_triplet_loss(z: torch.Tensor, labels: torch.Tensor, margin: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    """SCimilarity's mining: every anchor-positive pair, a random negative with 0 < d_ap - d_an + margin < margin
    on squared distances, then torch's triplet margin loss; pairs without such a negative are skipped."""
    with torch.no_grad():
        d2 = torch.cdist(z.float(), z.float()).pow(2)
        same = labels[:, None] == labels[None, :]
        a, p = torch.nonzero(torch.triu(same, diagonal=1), as_tuple=True)
        if len(a) == 0:
            return z.sum() * 0
        slack = d2[a, p][:, None] - d2[a] + margin
        ok = ~same[a] & (slack > 0) & (slack < margin)
        keep = ok.any(dim=1)
        scores = torch.rand(ok.shape, generator=generator, device="cpu").to(z.device).masked_fill(~ok, -1.0)
        n = scores.argmax(dim=1)
        a, p, n = a[keep], p[keep], n[keep]
    if len(a) == 0:
        return z.sum() * 0
    return F.triplet_margin_loss(z[a], z[p], z[n], margin=margin)


def batch_hard_triplet_loss(z: torch.Tensor, labels: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """For each anchor its farthest positive and nearest negative (a validation measure of separation)."""
    d = torch.cdist(z.float(), z.float())
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    hardest_pos = d.masked_fill(~same | eye, 0).max(dim=1).values
    hardest_neg = d.masked_fill(same, float("inf")).min(dim=1).values
    valid = (same & ~eye).any(dim=1) & (~same).any(dim=1)
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()
