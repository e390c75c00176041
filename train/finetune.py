"""LoRA fine-tuning of a SCimilarity encoder with a classification head, against frozen-encoder baselines.

    result = finetune(FinetuneConfig(base_model="base", data="train.h5ad", out="run"))

Base weights stay frozen (BatchNorm statistics too: its layers run in eval mode), so disabling the
adapters gives the base encoder back exactly. The head starts as the converged linear probe of the
base embedding (linear probing, then fine-tuning: LP-FT, Kumar et al. 2022). The frozen base decoder reconstructs the input from the
adapted embedding; that term keeps the embedding close to the base model's (less forgetting).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from scl.runtime.atomic import atomic_folder, refuse_used_folder
from scl.runtime.calls import NOVELTY_ALPHA, cosine_distance
from scl.runtime.conformal import Calibration
from scl.runtime.errors import SclError
from scl.runtime.integrity import file_sha256
from scl.runtime.expression import ReadOptions

from .calibrate import ALPHAS, calibrate, cross_fitted, novel_share
from .config import LOSSES, SCHEDULES, FinetuneConfig
from .data import EVAL_BATCH, LabelledCells, BatchOrder, dense, embed, load_labelled, read_batches, refuse_changed_files, steps_per_epoch, stream_block
from .device import autocast, resolve_device, seed_everything
from .distributed import Processes, lost_peers, training_processes
from .evaluate import LinearProbe, classification_metrics, knn_classifier, knn_transfer_accuracy, linear_probe, mean_cosine_drift
from .head import CellHead, fit_head, head_logits, lora_trained_head, marker_genes
from .losses import batch_hard_triplet_loss, semihard_triplet_loss
from .model_dir import SCimilarityModel, load_model_dir
from .centroids import class_centroids, unit
from .epoch_choice import EpochChoice, log_loss
from .schedule import lr_schedule
from .roles import TrainingCells, training_cells
from .run_dir import write_run

def linear_layer_names(encoder: torch.nn.Module) -> list[str]:
    return [name for name, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def reconstruction_mse(decoder, z: np.ndarray, x: sp.csr_matrix, device) -> float:
    total = 0.0
    for i in range(0, len(z), EVAL_BATCH):
        recon = decoder(torch.from_numpy(z[i : i + EVAL_BATCH]).to(device)).float()
        total += F.mse_loss(recon, dense(x, slice(i, i + EVAL_BATCH), device), reduction="sum").item()
    return total / (x.shape[0] * x.shape[1])


TRIPLET_CELLS = 4096  # the batch-hard measure compares every pair: on at most this many cells (the same sample for every method)


def embedding_metrics(z: np.ndarray, y: np.ndarray, cells: LabelledCells, decoder, margin: float, device) -> dict:
    """How well an embedding separates the labels (batch-hard triplet loss, on up to TRIPLET_CELLS cells) and still
    reconstructs the cells (base decoder)."""
    some = np.sort(np.random.default_rng(0).permutation(len(z))[:TRIPLET_CELLS])
    return {"reconstruction_mse": reconstruction_mse(decoder, z, cells.x, device),
            "batch_hard_triplet": batch_hard_triplet_loss(torch.from_numpy(z[some]), torch.from_numpy(y[some]), margin).item()}


class EncoderClassifier:
    """A trainable copy of the base encoder plus a linear head on the embedding; subclasses say what of the encoder
    trains (`trainable_encoder`)."""

    def __init__(self, base: SCimilarityModel, probe: LinearProbe, config: FinetuneConfig, device):
        self.encoder = self.trainable_encoder(base, config).to(device)
        self.head = torch.nn.Linear(base.latent_dim, len(probe.bias)).to(device)
        with torch.no_grad():  # linear probe, then fine-tune (LP-FT): the head starts converged on the base embedding
            self.head.weight.copy_(torch.from_numpy(probe.weight).float())
            self.head.bias.copy_(torch.from_numpy(probe.bias).float())
        self.decoder = copy.deepcopy(base.decoder).to(device).eval().requires_grad_(False)

    @staticmethod
    def trainable_encoder(base: SCimilarityModel, config: FinetuneConfig) -> torch.nn.Module:
        raise NotImplementedError

    def train_mode(self) -> None:
        """The base's BatchNorm statistics stay frozen weights, and its dropout stays off so the head sees the
        embeddings it will see in use; LoRA dropout regularises instead."""
        self.encoder.train()
        for name, m in self.encoder.named_modules():
            if isinstance(m, torch.nn.BatchNorm1d) or (isinstance(m, torch.nn.Dropout) and "lora_dropout" not in name):
                m.eval()

    def trainable_state(self) -> dict:
        state = {k: v.detach().clone() for k, v in self.encoder.named_parameters() if v.requires_grad}
        state.update({f"head.{k}": v.detach().clone() for k, v in self.head.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict) -> None:
        params = dict(self.encoder.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                if not k.startswith("head."):
                    params[k].copy_(v)
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})

    def parameter_counts(self) -> dict:
        enc_trainable = sum(p.numel() for p in self.encoder.parameters() if p.requires_grad)
        head = sum(p.numel() for p in self.head.parameters())
        total = sum(p.numel() for p in self.encoder.parameters()) + head
        return {"trainable": enc_trainable + head, "lora": enc_trainable, "head": head, "total": total}

    @torch.no_grad()
    def logits(self, z: np.ndarray, device) -> np.ndarray:
        return self.head(torch.from_numpy(z).to(device)).float().cpu().numpy()

    def probabilities(self, z: np.ndarray, device) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits(z, device)), dim=1).numpy()


class LoraClassifier(EncoderClassifier):
    """Only LoRA adapters on every linear layer of the encoder train (peft); the base weights stay as they were."""

    @staticmethod
    def trainable_encoder(base: SCimilarityModel, config: FinetuneConfig) -> torch.nn.Module:
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout, target_modules=linear_layer_names(base.encoder))
        return get_peft_model(copy.deepcopy(base.encoder), lora)


class FullFinetuneClassifier(EncoderClassifier):
    """Every encoder weight trains (no adapters): what LoRA is measured against in benchmarks/training_cost.py."""

    @staticmethod
    def trainable_encoder(base: SCimilarityModel, config: FinetuneConfig) -> torch.nn.Module:
        return copy.deepcopy(base.encoder).requires_grad_(True)

    def parameter_counts(self) -> dict:
        return super().parameter_counts() | {"lora": 0, "encoder": sum(p.numel() for p in self.encoder.parameters())}


class TrainStep(torch.nn.Module):
    """The modules a training step runs, as one module DistributedDataParallel can wrap."""

    def __init__(self, model: EncoderClassifier):
        super().__init__()
        self.encoder, self.head, self.decoder = model.encoder, model.head, model.decoder

    def forward(self, x: torch.Tensor, reconstruct: bool):
        z = self.encoder(x)
        return z, self.head(z), self.decoder(z) if reconstruct else None


def train_lora(base: SCimilarityModel, cells: TrainingCells, probe: LinearProbe, loss_kind: str, config: FinetuneConfig, device,
               progress: bool, classifier: type[EncoderClassifier] = LoraClassifier,
               processes: Processes = Processes()) -> tuple[EncoderClassifier, list[dict], int]:
    """Train the classifier on `cells.train`, choosing its epoch on `cells.validation`: (model at the best epoch,
    one history row per epoch, the best epoch). Under torchrun each process trains on its share of every batch."""
    train, y_train, val, y_val, classes = cells.train, cells.y_train, cells.validation, cells.y_val, cells.classes
    seed_everything(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    triplet_gen = processes.own_generator(gen, config.seed)
    model = classifier(base, probe, config, device)
    step = processes.wrap(TrainStep(model))
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": encoder_params, "lr": config.lr}, {"params": model.head.parameters(), "lr": config.head_lr}])
    order = BatchOrder(len(y_train), config.batch_size, gen, stream_block(train.x))
    steps = steps_per_epoch(len(y_train), config.batch_size, config.epoch_cells)
    scheduler = lr_schedule(optimizer, config.schedule, config.epochs, steps)
    y_train_t = torch.from_numpy(y_train).to(device)
    use_triplet, use_recon = "triplet" in loss_kind, "recon" in loss_kind
    history, choice = [], EpochChoice(config.patience)
    bar = tqdm(range(config.epochs), desc=f"LoRA {loss_kind}", unit="epoch", disable=not progress or not processes.is_main)
    for epoch in bar:
        model.train_mode()
        sums, n, cells_stepped, started = np.zeros(4), 0, 0, time.perf_counter()
        for index, x in read_batches(train.x, order, steps, processes.share, device):
            with autocast(device):
                z, logits, reconstruction = step(x, use_recon)
                ce = F.cross_entropy(logits.float(), y_train_t[index])
                recon = F.mse_loss(reconstruction.float(), x) if use_recon else torch.zeros((), device=device)
            triplet = semihard_triplet_loss(z.float(), y_train_t[index], config.margin, triplet_gen) if use_triplet else torch.zeros((), device=device)
            loss = ce + config.triplet_weight * triplet + config.recon_weight * recon
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums += [loss.item(), ce.item(), triplet.item(), recon.item()]
            n, cells_stepped = n + 1, cells_stepped + len(index)
        train_seconds = time.perf_counter() - started
        z_val = processes.split_work(len(val), lambda start, stop: embed(model.encoder, val.x[start:stop], device))
        p_val = model.probabilities(z_val, device)
        val_f1, val_loss = classification_metrics(y_val, p_val, classes)["macro_f1"], log_loss(p_val, y_val)
        means = processes.average(sums / max(n, 1))
        row = {"epoch": epoch + 1, **dict(zip(("loss", "ce", "triplet", "recon"), means.round(5).tolist())),
               "val_macro_f1": round(val_f1, 5), "val_loss": round(val_loss, 5), "train_seconds": round(train_seconds, 2),
               "cells_a_process": cells_stepped}
        history.append(row)
        bar.set_postfix(loss=row["loss"], val_f1=row["val_macro_f1"])
        if processes.agree(choice.offer(epoch + 1, val_f1, val_loss, model.trainable_state)):
            break
    model.load_trainable_state(choice.state)
    return model, history, choice.epoch


def sanity_checks(model: LoraClassifier, base: SCimilarityModel, val: LabelledCells, device) -> tuple[torch.nn.Module, dict, np.ndarray]:
    """Adapters off = base; merged = adapted; adapted != base. Returns the merged encoder too."""
    base_encoder = base.encoder.to(device)
    z_base = embed(base_encoder, val.x, device)
    with model.encoder.disable_adapter():
        z_disabled = embed(model.encoder, val.x, device)
    z_adapted = embed(model.encoder, val.x, device)
    merged = model.encoder.merge_and_unload()
    z_merged = embed(merged, val.x, device)
    checks = {
        "adapters_disabled_max_abs_diff_to_base": float(np.abs(z_disabled - z_base).max()),
        "merged_max_abs_diff_to_adapted": float(np.abs(z_merged - z_adapted).max()),
        "adapted_mean_cosine_drift_from_base": mean_cosine_drift(z_base, z_adapted),
    }
    checks["passed"] = bool(
        checks["adapters_disabled_max_abs_diff_to_base"] == 0.0
        and checks["merged_max_abs_diff_to_adapted"] <= 1e-5
        and checks["adapted_mean_cosine_drift_from_base"] > 0
    )
    return merged, checks, z_merged


def finetune(config: FinetuneConfig, progress: bool = True, ablation: bool = False) -> dict | None:
    """Train, measure and write RUN_DIR (config.out) in one step: it appears whole or not at all. Returns what
    metrics.json holds; under torchrun, on rank 0 (the others return None)."""
    if config.loss not in LOSSES:
        raise SclError(f"--loss {config.loss!r}: choose one of {', '.join(LOSSES)}.")
    if config.schedule not in SCHEDULES:
        raise SclError(f"--schedule {config.schedule!r}: choose one of {', '.join(SCHEDULES)}.")
    refuse_used_folder(config.out, "scl-train", ("metrics.json", "a finished run"))
    with training_processes(resolve_device(config.device), config.batch_size) as processes:
        return _finetune(config, processes, processes.device, progress, ablation)


def _finetune(config: FinetuneConfig, processes: Processes, device, progress: bool, ablation: bool) -> dict | None:
    base = load_model_dir(config.base_model)
    runs = [config.loss] + ([k for k in ("ce", "ce+triplet+recon") if k != config.loss] if ablation else [])
    with lost_peers(processes):
        cells = training_cells(config, base, processes)
        probe, methods = processes.on_main(lambda: frozen_baselines(base, cells, config, device))
        results = {loss_kind: train_lora(base, cells, probe, loss_kind, config, device, progress, processes=processes) for loss_kind in runs}
    if not processes.is_main:
        return None
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(config.out) as out_dir:
        return measure_and_write(Path(out_dir), results, base, cells, methods, config, device, processes, ablation)


def frozen_baselines(base: SCimilarityModel, cells: TrainingCells, config: FinetuneConfig, device) -> tuple[LinearProbe, dict]:
    """The linear probe of the base embedding (where the training head starts) and what the frozen base scores: the
    probe and a k-NN, both fitted on cells.fit_rows."""
    train, val, classes, y_train, y_val, fit = cells.train, cells.validation, cells.classes, cells.y_train, cells.y_val, cells.fit_rows
    z_fit_base = embed(base.encoder.to(device), train.x[fit], device)
    z_val_base = embed(base.encoder, val.x, device)
    probe = linear_probe(z_fit_base, y_train[fit], z_val_base, len(classes), config.seed)
    methods = {
        "base+linear": classification_metrics(y_val, probe.probabilities, classes) | {"fit": probe.fit},
        "base+knn": classification_metrics(y_val, knn_classifier(z_fit_base, y_train[fit], z_val_base, len(classes), config.knn_neighbors), classes),
    }
    base_embedding = embedding_metrics(z_val_base, y_val, val, base.decoder.to(device), config.margin, device)
    for name in methods:
        methods[name].update(base_embedding)
    return probe, methods


def measure_and_write(out_dir: Path, results: dict, base: SCimilarityModel, cells: TrainingCells, methods: dict, config: FinetuneConfig,
                      device, processes: Processes, ablation: bool) -> dict:
    """After training: merge, fit the shipped head, calibrate, measure and write the run into `out_dir`."""
    train, val, classes, y_train, y_val = cells.train, cells.validation, cells.classes, cells.y_train, cells.y_val
    base_decoder = base.decoder.to(device)
    model, history, best_epoch = results[config.loss]
    counts = model.parameter_counts()
    model.encoder.save_pretrained(str(out_dir / "adapter"))  # before merging: the adapter in peft's format
    merged, checks, z_val = sanity_checks(model, base, val, device)
    fit = cells.fit_rows
    x_fit = train.x[fit].tocsr() if config.head_genes else train.x[fit]  # the head reads genes: read once (streamed: from the file)
    z_fit = embed(merged, x_fit, device)
    head, head_summary = shipped_head(model, z_fit, x_fit, cells, config, base.gene_order)
    methods["lora"] = classification_metrics(y_val, softmax(head_logits(head, z_val, val.x)), classes) | embedding_metrics(z_val, y_val, val, base_decoder, config.margin, device)
    if config.head_genes:  # what the genes add, and what they do without the encoder
        methods["lora-embedding"] = classification_metrics(y_val, model.probabilities(z_val, device), classes)
        genes_only = fit_head(np.zeros((len(fit), 0), np.float32), x_fit, y_train[fit], len(classes), head.gene_index.numpy(), config.head_c, config.seed)
        methods["genes"] = classification_metrics(y_val, softmax(head_logits(genes_only, np.zeros((len(val), 0), np.float32), val.x)), classes)
    centroids = class_centroids(z_fit, y_train[fit], len(classes))
    calibration, calibration_metrics = calibrate_run(head, merged, centroids, cells, config, device)
    calibration_metrics["novel_share"] = {"validation": novelty_shares(head, calibration, centroids, z_val, val.x)}

    metrics = {
        "config": config.to_dict(),
        "device": str(device),
        "processes": processes.describe(),
        "cells": {"train": len(train), "validation": len(val), "calibration": len(cells.calibration)},
        "classes": classes,
        "parameters": counts,
        "best_epoch": best_epoch,
        "epochs": {"max": config.epochs, "run": len(history), "best": best_epoch, "patience": config.patience},
        "validation": cells.validation_summary,
        "history": history,
        "head": head_summary,
        "sanity_checks": checks,
        "methods": methods,
        "calibration": calibration_metrics,
        "genes": {k: v for k, v in train.reading[0]["genes"].items() if not k.startswith("examples")},
        "training_data_sha256": file_sha256(config.data),
        "base_model_encoder_sha256": file_sha256(str(Path(config.base_model) / "encoder.ckpt")),
    }
    if ablation:
        metrics["ablation"] = ablation_rows(results, y_val, val, classes, config.margin, device)
    if config.forgetting_data:
        metrics["forgetting"], z_other, other = forgetting(config, base, merged, device)
        calibration_metrics["novel_share"]["forgetting_data"] = novelty_shares(head, calibration, centroids, z_other, other.x)
    tuned = SCimilarityModel(merged.cpu().eval(), base.decoder.cpu(), base.gene_order, classes)
    refuse_changed_files(train, val, cells.calibration)  # streamed cells: still the files' (the run folder is not renamed in)
    write_run(out_dir, tuned, head, centroids, calibration, metrics)
    return metrics


def shipped_head(model: EncoderClassifier, z_fit: np.ndarray, x_fit: sp.csr_matrix, cells: TrainingCells, config: FinetuneConfig,
                 gene_order: list[str]) -> tuple[CellHead, dict]:
    """The head scl-train writes: a logistic regression on the fine-tuned embedding and the marker genes of the training
    cells of cells.fit_rows (z_fit, x_fit) (train/head.py), or with head_genes=0 the head LoRA trained on the embedding alone."""
    if not config.head_genes:
        return lora_trained_head(model.head), {"reads": "the embedding", "genes": 0, "trained": "with LoRA (the epoch validation chose)"}
    started = time.perf_counter()
    y_fit = cells.y_train[cells.fit_rows]
    genes = marker_genes(x_fit, y_fit, config.head_genes, config.seed)
    head = fit_head(z_fit, x_fit, y_fit, len(cells.classes), genes, config.head_c, config.seed)
    weights = head.gene_weight.detach().numpy()
    strongest = {c: [gene_order[genes[i]] for i in np.argsort(-weights[k])[:5]] for k, c in enumerate(cells.classes)}
    return head, {"reads": "the embedding and marker genes", "genes_per_class": config.head_genes, "genes": int(len(genes)), "C": config.head_c,
                  "trained": "logistic regression on the training cells, after LoRA", "seconds": round(time.perf_counter() - started, 1),
                  "max_row_norm": round(head.max_row_norm(), 2), "strongest_genes": strongest}


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def calibrate_run(head: CellHead, merged, centroids: np.ndarray, cells: TrainingCells, config: FinetuneConfig,
                  device) -> tuple[Calibration, dict]:
    """Temperature and conformal scores from the calibration cells, and what they measure (cross-fitted)."""
    y_cal, classes = cells.y_cal, cells.classes
    z = embed(merged, cells.calibration.x, device)
    logits = head_logits(head, z, cells.calibration.x)
    distances = cosine_distance(z, unit(centroids), logits.argmax(axis=1))
    calibration = calibrate(logits, y_cal, distances, len(classes), optimistic=cells.optimistic, source=cells.calibration_source)
    accuracy = classification_metrics(y_cal, softmax(logits), classes)
    return calibration, {
        "source": cells.calibration_source, "optimistic": cells.optimistic, "cells": len(y_cal), "temperature": round(calibration.temperature, 4),
        "cells_per_class": dict(zip(classes, np.bincount(y_cal, minlength=len(classes)).tolist())),
        "lora_on_calibration_cells": {k: accuracy[k] for k in ("top1", "macro_f1", "balanced_accuracy")},
        "cross_fitted": cross_fitted(logits, y_cal, distances, len(classes), config.seed),
    }


def novelty_shares(head: CellHead, calibration: Calibration, centroids: np.ndarray, z: np.ndarray, x) -> dict:
    """Share of cells flagged novel at each reported alpha (and at the runtime's default level)."""
    probs = softmax(head_logits(head, z, x))
    distances = cosine_distance(z, unit(centroids), probs.argmax(axis=1))
    return {str(a): novel_share(calibration, probs, distances, a) for a in sorted({NOVELTY_ALPHA, *ALPHAS})}


def ablation_rows(results: dict, y_val, val, classes, margin: float, device) -> dict:
    rows = {}
    for loss_kind, (model, _, best_epoch) in results.items():
        z = embed(model.encoder, val.x, device)
        m = classification_metrics(y_val, model.probabilities(z, device), classes)
        rows[loss_kind] = {"macro_f1": m["macro_f1"], "top1": m["top1"], "balanced_accuracy": m["balanced_accuracy"], "best_epoch": best_epoch,
                           **embedding_metrics(z, y_val, val, model.decoder, margin, device)}
    return rows


def forgetting(config: FinetuneConfig, base: SCimilarityModel, merged, device) -> tuple[dict, np.ndarray, LabelledCells]:
    """How well the base's knowledge of other cells survived; returns the metrics, the tuned embedding of those cells and the cells."""
    other = load_labelled(config.forgetting_data, base.gene_order, config.forgetting_label_key, ReadOptions(min_genes=config.min_genes), config.stream)
    z_base = embed(base.encoder, other.x, device)
    z_tuned = embed(merged, other.x, device)
    return {
        "data": config.forgetting_data,
        "cells": len(other),
        "knn_transfer_accuracy_base": knn_transfer_accuracy(z_base, other.labels, config.knn_neighbors),
        "knn_transfer_accuracy_finetuned": knn_transfer_accuracy(z_tuned, other.labels, config.knn_neighbors),
        "mean_cosine_drift": mean_cosine_drift(z_base, z_tuned),
    }, z_tuned, other
