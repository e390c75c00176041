"""The SCimilarity network, layer for layer as scimilarity.nn_models, so state dicts load both ways."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(n_in: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(p=dropout), nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.PReLU())


class Encoder(nn.Module):
    """genes -> hidden layers (dropout, linear, batch norm, PReLU) -> latent, L2-normalised."""

    def __init__(self, n_genes: int, latent_dim: int = 128, hidden_dim=(1024, 1024), dropout: float = 0.5, input_dropout: float = 0.4):
        super().__init__()
        sizes = [n_genes, *hidden_dim]
        self.network = nn.ModuleList(
            _block(sizes[i], sizes[i + 1], input_dropout if i == 0 else dropout) for i in range(len(hidden_dim))
        )
        self.network.append(nn.Linear(hidden_dim[-1], latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.network:
            x = layer(x)
        return F.normalize(x, p=2, dim=1)


class Decoder(nn.Module):
    """latent -> hidden layers in reverse -> genes (log-normalised expression)."""

    def __init__(self, n_genes: int, latent_dim: int = 128, hidden_dim=(1024, 1024), dropout: float = 0.5):
        super().__init__()
        sizes = [latent_dim, *hidden_dim]
        blocks = [_block(sizes[i], sizes[i + 1], dropout) for i in range(len(hidden_dim))]
        blocks[0] = nn.Sequential(*list(blocks[0])[1:])  # SCimilarity's first decoder layer has no dropout
        self.network = nn.ModuleList(blocks)
        self.network.append(nn.Linear(hidden_dim[-1], n_genes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for layer in self.network:
            z = layer(z)
        return z
