"""Build a SCimilarity-format base model from labelled cells, with SCimilarity's own recipe."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from scl.runtime.expression import ReadOptions

from .config import PretrainConfig
from .data import LabelledCells, batches, dense, gene_union, load_labelled, refuse_tiny_classes
from .device import autocast, resolve_device
from .losses import semihard_triplet_loss
from .model_dir import SCimilarityModel, read_gene_order, save_model_dir
from .nn import Decoder, Encoder


def pretrain(config: PretrainConfig, progress: bool = True) -> tuple[SCimilarityModel, list[dict]]:
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    options = ReadOptions(min_genes=config.min_genes)
    genes = read_gene_order(config.gene_order) if config.gene_order else gene_union(config.data, options)
    cells = load_labelled(config.data, genes, config.label_key, options)
    refuse_tiny_classes(cells.labels, ", ".join(config.data))
    model, history = train_base(cells, genes, config, device, progress)
    save_model_dir(config.out, model)
    return model, history


def train_base(cells: LabelledCells, genes: list[str], config: PretrainConfig, device, progress: bool) -> tuple[SCimilarityModel, list[dict]]:
    classes, label_ids = np.unique(cells.labels, return_inverse=True)
    label_ids = torch.from_numpy(label_ids).to(device)
    encoder = Encoder(len(genes), config.latent_dim, config.hidden_dim).to(device)
    decoder = Decoder(len(genes), config.latent_dim, list(reversed(config.hidden_dim))).to(device)
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    gen = torch.Generator().manual_seed(config.seed)
    w = config.triplet_weight
    history = []
    bar = tqdm(range(config.epochs), desc="pretrain", unit="epoch", disable=not progress)
    for epoch in bar:
        encoder.train(), decoder.train()
        totals = np.zeros(3)
        n_batches = 0
        for index in batches(len(cells), min(config.batch_size, len(cells)), gen):
            x = dense(cells.x, index, device)
            with autocast(device):
                z = encoder(x)
                mse = torch.nn.functional.mse_loss(decoder(z).float(), x)
            triplet = semihard_triplet_loss(z.float(), label_ids[index], config.margin, gen)
            loss = w * triplet + (1 - w) * mse
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals += [loss.item(), triplet.item(), mse.item()]
            n_batches += 1
        scheduler.step()
        row = dict(zip(("loss", "triplet", "mse"), (totals / max(n_batches, 1)).round(5)), epoch=epoch + 1)
        history.append(row)
        bar.set_postfix(loss=row["loss"], triplet=row["triplet"], mse=row["mse"])
    return SCimilarityModel(encoder.cpu().eval(), decoder.cpu().eval(), genes, list(classes)), history
