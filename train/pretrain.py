"""Build a SCimilarity-format base model from labelled cells, with SCimilarity's own recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scl.runtime.atomic import atomic_folder, refuse_used_folder
from scl.runtime.expression import ReadOptions
from scl.runtime.integrity import file_sha256

from .config import PretrainConfig
from .data import BatchOrder, LabelledCells, embed, read_batches, refuse_changed_files, steps_per_epoch, stream_block, gene_union, load_labelled, refuse_tiny_classes, stratified_holdout
from .device import autocast, resolve_device, seed_everything
from .distributed import Processes, lost_peers, training_processes
from .losses import semihard_triplet_loss
from .model_dir import SCimilarityModel, read_gene_order, save_model_dir
from .nn import Decoder, Encoder


# Median per-feature std of a 128-wide embedding below which classifiers on it need huge weights (scaled by
# sqrt(128 / width) for other widths: a unit vector spread evenly has std 1/sqrt(width)). Measured on PBMC + brain
# cells: triplet weight 0.001 -> 0.002, 0.1 -> 0.006 (LoRA heads with row norms ~11,000; fp32 export refused),
# 0.5 -> 0.018 (row norms 13). README, "Build a base model".
NARROW_EMBEDDING_STD = 0.01


def pretrain(config: PretrainConfig, progress: bool = True) -> tuple[SCimilarityModel, dict] | None:
    """Train, write the model directory and its pretrain.json; returns the model and what pretrain.json holds (under
    torchrun on rank 0; the other processes return None)."""
    refuse_used_folder(config.out, "scl-pretrain", ("encoder.ckpt", "a model"))
    seed_everything(config.seed)
    with training_processes(resolve_device(config.device), config.batch_size) as processes:
        options = ReadOptions(min_genes=config.min_genes)
        genes = read_gene_order(config.gene_order) if config.gene_order else gene_union(config.data, options)
        cells, held_out = hold_out(config, genes, options)
        refuse_tiny_classes(cells.labels, ", ".join(config.data))
        with lost_peers(processes):
            model, history = train_base(cells, genes, config, processes.device, progress, processes)
        return write_base(model, history, cells, held_out, config, processes) if processes.is_main else None


def write_base(model: SCimilarityModel, history: list[dict], cells: LabelledCells, held_out: dict, config: PretrainConfig,
               processes: Processes) -> tuple[SCimilarityModel, dict]:
    """The model folder and its pretrain.json, written under a temporary name and renamed: whole or not at all."""
    summary = {"config": config.to_dict(), "processes": processes.describe(), "history": history,
               "embedding_feature_std": embedding_spread(model.encoder, cells), "held_out": held_out}
    refuse_changed_files(cells)
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(config.out) as tmp:
        save_model_dir(tmp, model)
        (Path(tmp) / "pretrain.json").write_text(json.dumps(summary, indent=1))
    return model, summary


def hold_out(config: PretrainConfig, genes: list[str], options: ReadOptions) -> tuple[LabelledCells, dict]:
    """The training cells of every file, and pretrain.json's record of what was kept out: per file its SHA-256 and the
    obs positions of the held-out cells, so that scl-train can calibrate on cells this base never saw."""
    parts, files = [], []
    for path in config.data:
        cells = load_labelled(path, genes, config.label_key, options, config.stream)
        held = stratified_holdout(cells.labels, config.holdout, config.seed)
        parts.append(cells.subset(~held))
        files.append({"path": path, "sha256": file_sha256(path), "cells": len(cells), "held_out_rows": cells.rows[held].tolist()})
    return LabelledCells.concat(parts), {"share": config.holdout, "seed": config.seed, "files": files}


def embedding_spread(encoder: Encoder, cells: LabelledCells, sample: int = 2048, seed: int = 0) -> float:
    """Median over the embedding's features of their standard deviation across (a sample of) the training cells."""
    index = np.sort(np.random.default_rng(seed).choice(len(cells), min(sample, len(cells)), replace=False))
    z = embed(encoder, cells.x[index], next(encoder.parameters()).device)
    return round(float(np.median(z.std(axis=0))), 5)


def narrow_embedding_warning(spread: float, latent_dim: int) -> str | None:
    limit = NARROW_EMBEDDING_STD * (128 / latent_dim) ** 0.5
    if spread >= limit:
        return None
    return (f"warning: the embedding is narrow (per-feature std {spread:.4f} < {limit:.4f}): classifiers on it need huge weights, "
            "which float rounding and int8 punish; on small data train again with --triplet-weight 0.5.")


class Autoencoder(torch.nn.Module):
    """Encoder and decoder as one module DistributedDataParallel can wrap: (embedding, reconstruction)."""

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        return z, self.decoder(z)


def train_base(cells: LabelledCells, genes: list[str], config: PretrainConfig, device, progress: bool,
               processes: Processes = Processes()) -> tuple[SCimilarityModel, list[dict]]:
    """Under torchrun each process trains on its share of every batch (batch norm's statistics over that share)."""
    classes, label_ids = np.unique(cells.labels, return_inverse=True)
    label_ids = torch.from_numpy(label_ids).to(device)
    encoder = Encoder(len(genes), config.latent_dim, config.hidden_dim).to(device)
    decoder = Decoder(len(genes), config.latent_dim, list(reversed(config.hidden_dim))).to(device)
    step = processes.wrap(Autoencoder(encoder, decoder))
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    gen = torch.Generator().manual_seed(config.seed)
    triplet_gen = processes.own_generator(gen, config.seed)
    w = config.triplet_weight
    order = BatchOrder(len(cells), config.batch_size, gen, stream_block(cells.x))
    steps = steps_per_epoch(len(cells), config.batch_size, config.epoch_cells)
    history = []
    bar = tqdm(range(config.epochs), desc="pretrain", unit="epoch", disable=not progress or not processes.is_main)
    for epoch in bar:
        encoder.train(), decoder.train()
        totals = np.zeros(3)
        n_batches = 0
        for index, x in read_batches(cells.x, order, steps, processes.share, device):
            with autocast(device):
                z, reconstruction = step(x)
                mse = torch.nn.functional.mse_loss(reconstruction.float(), x)
            triplet = semihard_triplet_loss(z.float(), label_ids[index], config.margin, triplet_gen)
            loss = w * triplet + (1 - w) * mse
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals += [loss.item(), triplet.item(), mse.item()]
            n_batches += 1
        scheduler.step()
        row = dict(zip(("loss", "triplet", "mse"), processes.average(totals / max(n_batches, 1)).round(5)), epoch=epoch + 1)
        history.append(row)
        bar.set_postfix(loss=row["loss"], triplet=row["triplet"], mse=row["mse"])
    return SCimilarityModel(encoder.cpu().eval(), decoder.cpu().eval(), genes, list(classes)), history
