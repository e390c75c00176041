"""What a training run is told, apart from the code that carries it out (as peft keeps LoraConfig)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from scl.runtime.bounds import AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, SEED, SHARE, Bounds, check_bounds


@dataclass
class PretrainConfig:
    """SCimilarity's MetricLearning recipe: semi-hard triplets on labels plus reconstruction."""

    data: list[str]
    label_key: str = "cell_type"
    out: str = "base_model"
    gene_order: str | None = None  # a gene_order.tsv; None: the union of the files' genes
    hidden_dim: list[int] = field(default_factory=lambda: [1024, 1024])
    latent_dim: int = 128
    epochs: int = 10
    batch_size: int = 256
    lr: float = 5e-3
    weight_decay: float = 0.01
    triplet_weight: float = 0.001  # loss = w * triplet + (1 - w) * MSE, as SCimilarity mixes them
    margin: float = 0.05
    holdout: float = 0.2  # share of each file's cells (per label) kept out of training, for scl-train to calibrate on
    min_genes: int | None = None
    seed: int = 0
    device: str = "auto"
    stream: bool = False  # leave the cells in their files and read them a window at a time (references larger than memory)
    epoch_cells: int | None = None  # cells an epoch trains on (None: every cell once)

    to_dict = asdict

    # batches of 2 or more: the encoder's batch norm cannot train on one cell
    BOUNDS: ClassVar[dict[str, Bounds]] = {"epochs": AT_LEAST_ONE, "batch_size": Bounds(2, whole=True), "lr": POSITIVE, "weight_decay": NOT_NEGATIVE,
                                           "triplet_weight": Bounds(0, 1), "margin": NOT_NEGATIVE, "holdout": Bounds(0, 1, high_open=True), "seed": SEED,
                                           "epoch_cells": AT_LEAST_ONE}

    def __post_init__(self):
        check_bounds(self, self.BOUNDS)


LOSSES = ("ce", "ce+triplet", "ce+triplet+recon")
SCHEDULES = ("constant", "cosine")


@dataclass
class FinetuneConfig:
    """LoRA on the encoder's Linear layers; loss = CE + w_t * triplet + w_r * MSE(frozen decoder)."""

    base_model: str
    data: str
    label_key: str = "cell_type"
    out: str = "run"
    val_data: str | None = None
    val_fraction: float = 0.2
    calibration_data: str | None = None  # cells used only to calibrate; default: the cells of `data` the base held out
    calibration_fraction: float = 0.2  # split off `data` when the base keeps no held-out cells of it
    rank: int = 8
    alpha: int = 16
    lora_dropout: float = 0.1
    lr: float = 1e-3  # lr, epochs and schedule: chosen by benchmarks/recipe.py (README, "Choosing the fine-tuning recipe")
    head_lr: float = 1e-3
    epochs: int = 20  # the most; training stops earlier after `patience` epochs without a better validation
    patience: int = 3
    head_genes: int = 100  # marker genes per class the shipped head reads beside the embedding (0: the embedding alone)
    head_c: float = 0.1  # the shipped head's inverse regularisation; head_genes and head_c chosen by benchmarks/head_genes.py
    schedule: str = "constant"  # or "cosine": one epoch of warm-up, then cosine decay over `epochs` (schedule.py)
    batch_size: int = 64
    loss: str = "ce+triplet+recon"
    triplet_weight: float = 1.0
    recon_weight: float = 1.0
    margin: float = 0.05
    forgetting_data: str | None = None
    forgetting_label_key: str = "cell_type"
    knn_neighbors: int = 15
    min_genes: int | None = None
    seed: int = 0
    device: str = "auto"
    stream: bool = False  # leave the cells in their files and read them a window at a time (references larger than memory)
    epoch_cells: int | None = None  # training cells between validations (None: every training cell once)

    to_dict = asdict

    BOUNDS: ClassVar[dict[str, Bounds]] = {
        "val_fraction": SHARE, "calibration_fraction": SHARE, "rank": AT_LEAST_ONE, "alpha": POSITIVE, "lora_dropout": Bounds(0, 1, high_open=True),
        "lr": POSITIVE, "head_lr": POSITIVE, "head_genes": Bounds(0, whole=True), "head_c": POSITIVE, "epochs": AT_LEAST_ONE, "patience": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "triplet_weight": NOT_NEGATIVE,
        "recon_weight": NOT_NEGATIVE, "margin": NOT_NEGATIVE, "knn_neighbors": AT_LEAST_ONE, "seed": SEED, "epoch_cells": AT_LEAST_ONE}

    def __post_init__(self):
        check_bounds(self, self.BOUNDS)


# Named settings that --recipe applies under the flags given: "seed" reproduces the seed's runs (lr 1e-4, 5 epochs,
# constant rate, the head on the embedding alone), which benchmarks/recipe.py measured against the defaults.
RECIPES: dict[str, dict] = {"default": {}, "seed": {"lr": 1e-4, "epochs": 5, "schedule": "constant", "head_genes": 0}}
