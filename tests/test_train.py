"""scl-pretrain and scl-train on real cells: real training steps, small networks, the real gene order."""

import json
import re

import anndata as ad
import numpy as np
import pytest
import torch

from scl.runtime.errors import SclError
from scl.train.config import FinetuneConfig
from scl.train.finetune import finetune
from scl.train.model_dir import load_model_dir

from conftest import run

def test_pretrained_base_loads_in_scimilarity(base_dir):
    from scl.train.pretrain import narrow_embedding_warning
    from scimilarity import CellEmbedding

    ce = CellEmbedding(model_path=str(base_dir))
    ours = load_model_dir(base_dir)
    assert ce.n_genes == 28231 and ce.latent_dim == 16
    assert len(ours.labels) == 7 + 9  # PBMC populations and brain types
    summary = json.loads((base_dir / "pretrain.json").read_text())
    assert len(summary["history"]) == 2 and all(np.isfinite(h["loss"]) for h in summary["history"])
    spread = summary["embedding_feature_std"]
    assert 0 < spread < 1
    assert ("warning: the embedding is narrow" in (base_dir.parent / "stderr.txt").read_text()) == (narrow_embedding_warning(spread, 16) is not None)


def test_a_collapsed_embedding_is_called_narrow():
    """A last layer that ignores its input maps every cell to one direction: spread ~0 and a warning; at
    initialisation the embedding is spread and passes."""
    import scipy.sparse as sp
    import torch

    from scl.train.data import LabelledCells
    from scl.train.nn import Encoder
    from scl.train.pretrain import embedding_spread, narrow_embedding_warning

    rng = np.random.default_rng(0)
    cells = LabelledCells(sp.csr_matrix(rng.poisson(1.0, (300, 50)).astype(np.float32)), np.array(["a", "b"] * 150), np.arange(300).astype(str), [], np.arange(300))
    encoder = Encoder(50, latent_dim=16, hidden_dim=(32,)).eval()
    spread = embedding_spread(encoder, cells)
    assert spread > 0.05 and narrow_embedding_warning(spread, 16) is None
    with torch.no_grad():
        encoder.network[-1].weight.mul_(1e-5)
        encoder.network[-1].bias.fill_(1.0)
    collapsed = embedding_spread(encoder, cells)
    assert collapsed < 1e-3 and "--triplet-weight 0.5" in narrow_embedding_warning(collapsed, 16)


def test_run_dir_has_every_artifact_and_report(run_dir):
    for name in ("model/encoder.ckpt", "model/decoder.ckpt", "adapter/adapter_config.json", "head.pt", "classes.json",
                 "metrics.json", "report.md", "confusion_lora.png", "confusion_base_linear.png", "confused_pairs_lora.csv"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"base+linear", "base+knn", "genes", "lora-embedding", "lora"}
    for name, m in metrics["methods"].items():
        # 7 balanced classes: chance is 0.14; this tiny 2-epoch model measured 0.51 (k-NN) to 0.61 (probe, LoRA)
        assert 0.35 <= m["macro_f1"] <= 1 and m["top3"] >= m["top1"]
        assert len(m["per_class"]) == 7 and np.array(m["confusion_matrix"]).sum() == 70
        if name not in ("genes", "lora-embedding"):  # the embedding's own measures
            assert m["reconstruction_mse"] > 0 and m["batch_hard_triplet"] >= 0
    head, state = metrics["head"], torch.load(run_dir / "head.pt", weights_only=True)
    assert head["genes_per_class"] == FinetuneConfig.head_genes and head["genes"] == len(state["gene_index"]) == state["gene_weight"].shape[1]
    assert FinetuneConfig.head_genes <= head["genes"] <= 7 * FinetuneConfig.head_genes and set(head["strongest_genes"]) == set(json.loads((run_dir / "classes.json").read_text()))
    assert metrics["methods"]["base+linear"]["fit"]["converged"]
    assert set(metrics["ablation"]) == {"ce", "ce+triplet+recon"}
    f = metrics["forgetting"]
    assert f["cells"] == 126 and f["mean_cosine_drift"] > 0 and 0 < f["knn_transfer_accuracy_finetuned"] <= 1
    p = metrics["parameters"]
    lora = 8 * ((28231 + 64) + (64 + 32) + (32 + 16))  # r * (in + out) per Linear layer
    assert p["lora"] == lora and p["head"] == 16 * 7 + 7 and p["trainable"] == lora + 16 * 7 + 7 < p["total"]
    report = (run_dir / "report.md").read_text()
    assert "## Ablation" in report and "## Forgetting" in report and "confusion_lora.png" in report


def test_sanity_checks_hold(run_dir):
    checks = json.loads((run_dir / "metrics.json").read_text())["sanity_checks"]
    assert checks["adapters_disabled_max_abs_diff_to_base"] == 0.0
    assert checks["merged_max_abs_diff_to_adapted"] <= 1e-5
    assert checks["adapted_mean_cosine_drift_from_base"] > 0
    assert checks["passed"]


def test_merged_encoder_equals_peft_adapter_and_loads_in_scimilarity(run_dir, base_dir, small_data):
    from peft import PeftModel
    from scimilarity import CellEmbedding

    from scl.runtime.expression import ExpressionSource

    base = load_model_dir(base_dir)
    with ExpressionSource(str(small_data / "val.h5ad"), base.gene_order) as src:
        _, x = next(src.blocks())
    x = torch.from_numpy(x)
    adapted = PeftModel.from_pretrained(base.encoder, str(run_dir / "adapter")).eval()
    merged = CellEmbedding(model_path=str(run_dir / "model"))
    with torch.no_grad():
        z_adapter = adapted(x).numpy()
    z_merged = merged.get_embeddings(x.numpy())
    assert np.abs(z_adapter - z_merged).max() <= 1e-5
    assert merged.int2label[0] == "B"


def test_same_seed_same_result(base_dir, small_data, tmp_path):
    results = []
    for name in ("a", "b"):
        cfg = FinetuneConfig(base_model=str(base_dir), data=str(small_data / "train.h5ad"), out=str(tmp_path / name), epochs=1, loss="ce+triplet+recon")
        results.append(finetune(cfg, progress=False)["methods"]["lora"]["confusion_matrix"])
    assert results[0] == results[1]


@pytest.mark.parametrize("overrides, words", [
    (dict(epochs=0), "epochs 0: give a whole number, 1 or more, such as 20 (the default)"),
    (dict(lr=float("nan")), "lr nan: give a number above 0"),
    (dict(val_fraction=1.5), "val_fraction 1.5: give a number in (0, 1), such as 0.2"),
    (dict(calibration_fraction=0), "calibration_fraction 0: give a number in (0, 1)"),
    (dict(batch_size=0), "batch_size 0: give a whole number, 1 or more"),
    (dict(rank=2.5), "rank 2.5: give a whole number"),
    (dict(lora_dropout=1), "lora_dropout 1: give a number in [0, 1)"),
    (dict(seed=-1), "seed -1: give a whole number from 0 to 4294967295"),
    (dict(recon_weight=float("inf")), "recon_weight inf: give a number from 0 up"),
])
def test_settings_out_of_bounds_are_refused_before_any_work(overrides, words):
    with pytest.raises(SclError, match=re.escape(words)) as err:
        FinetuneConfig(base_model="b", data="d", **overrides)
    assert err.value.options == (next(iter(overrides)),)  # the CLI spells it as the flag of the same name


def test_scl_train_and_pretrain_refuse_bad_numbers_in_one_line(small_data, tmp_path):
    for args, words in (
        (["scl-train", "--base-model", tmp_path, "--data", small_data / "train.h5ad", "--out", tmp_path / "r", "--epochs", "0"], "(see --epochs)"),
        (["scl-train", "--base-model", tmp_path, "--data", small_data / "train.h5ad", "--out", tmp_path / "r", "--batch-size", "0"], "(see --batch-size)"),
        (["scl-pretrain", "--data", small_data / "train.h5ad", "--out", tmp_path / "p", "--holdout", "1"], "holdout 1.0: give a number in [0, 1)"),
        (["scl-pretrain", "--data", small_data / "train.h5ad", "--out", tmp_path / "p", "--lr", "nan"], "(see --lr)"),
        (["scl-pretrain", "--data", small_data / "train.h5ad", "--out", tmp_path / "p", "--batch-size", "1"], "batch_size 1: give a whole number, 2 or more"),
        (["scl-pretrain", "--data", small_data / "train.h5ad", "--out", tmp_path / "p", "--hidden", "64,0"], "--hidden '64,0': give layer sizes"),
    ):
        code, _, stderr = run(*args)
        assert code == 1 and words in stderr and stderr.startswith("Error:") and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()


def test_bad_training_input(base_dir, small_data, tmp_path):
    one = ad.read_h5ad(small_data / "train.h5ad")
    one.obs["cell_type"] = one.obs["cell_type"].astype(str)
    one.obs.iloc[0, one.obs.columns.get_loc("cell_type")] = "lonely"
    one.write_h5ad(tmp_path / "lonely.h5ad")
    single = ad.read_h5ad(small_data / "train.h5ad")
    single.obs["cell_type"] = "B"
    single.write_h5ad(tmp_path / "single.h5ad")
    unseen = ad.read_h5ad(small_data / "val.h5ad")  # cells no other role holds, one label training lacks
    unseen.obs["cell_type"] = unseen.obs["cell_type"].astype(str)
    unseen.obs.iloc[0, unseen.obs.columns.get_loc("cell_type")] = "lonely"
    unseen.write_h5ad(tmp_path / "unseen_label.h5ad")
    cases = [
        (dict(data=str(tmp_path / "lonely.h5ad")), "class 'lonely' (1) has fewer than 2 cells"),
        (dict(data=str(tmp_path / "single.h5ad")), "every labelled cell is 'B'; a classifier needs at least two cell types"),
        (dict(label_key="celltype"), "obs has no column 'celltype'"),
        (dict(min_genes=20000), "only 8228 of the model's 28231 genes"),
        (dict(loss="mse"), "--loss 'mse'"),
        (dict(calibration_data=str(tmp_path / "unseen_label.h5ad")), "calibration labels \\['lonely'\\] never occur in the training data"),
    ]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), "--device cuda was asked for but torch sees no CUDA GPU"))
    for overrides, words in cases:
        cfg = FinetuneConfig(**{"base_model": str(base_dir), "data": str(small_data / "train.h5ad"), "out": str(tmp_path / "x"), "epochs": 1, **overrides})
        with pytest.raises(SclError, match=words.replace("(", r"\(").replace(")", r"\)")):
            finetune(cfg, progress=False)
    code, _, stderr = run("scl-train", "--base-model", base_dir, "--data", small_data / "train.h5ad", "--label-key", "nope", "--out", tmp_path / "y")
    assert code == 1 and stderr.strip().startswith("Error:") and len(stderr.strip().splitlines()) == 1


def test_missing_label_spellings_are_left_out_and_counted(small_data, scimilarity_genes, tmp_path, caplog):
    from scl.train.data import load_labelled

    cells = ad.read_h5ad(small_data / "train.h5ad")
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    labels[:3], labels[3], labels[4] = "nan", "", "N/A"  # what astype(str), spreadsheets and exports make of missing labels
    cells.obs["cell_type"] = labels
    cells.write_h5ad(tmp_path / "gaps.h5ad")
    with caplog.at_level("WARNING", logger="scl"):
        loaded = load_labelled(str(tmp_path / "gaps.h5ad"), scimilarity_genes, "cell_type")
    assert len(loaded) == cells.n_obs - 5 and "nan" not in set(loaded.labels) and "" not in set(loaded.labels)
    assert list(loaded.cell_ids) == list(cells.obs_names[5:])
    assert "5 of 210 cells have no label" in caplog.text


def test_validation_without_a_class_warns_and_scores_the_classes_it_holds(base_dir, small_data, tmp_path, caplog):
    val = ad.read_h5ad(small_data / "val.h5ad")
    val[val.obs["cell_type"] != "NK"].copy().write_h5ad(tmp_path / "val_no_nk.h5ad")
    cfg = FinetuneConfig(base_model=str(base_dir), data=str(small_data / "train.h5ad"), val_data=str(tmp_path / "val_no_nk.h5ad"),
                         out=str(tmp_path / "run"), epochs=1)
    with caplog.at_level("WARNING", logger="scl"):
        metrics = finetune(cfg, progress=False)
    assert "the validation cells include no 'NK'" in caplog.text
    lora = metrics["methods"]["lora"]
    per_class = [v["f1"] for c, v in lora["per_class"].items() if c != "NK"]
    assert lora["macro_f1"] == pytest.approx(np.mean(per_class), abs=1e-9)  # over the 6 classes present, not 7


def test_confusion_matrices_say_what_they_show(run_dir, tmp_path, monkeypatch):
    import shutil

    import scl.train.report as report

    titles = []
    monkeypatch.setattr(report, "plot_confusion", lambda cm, classes, title, path: titles.append(title))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    shutil.copytree(run_dir, tmp_path / "run")
    report.write_report(tmp_path / "run", metrics)
    lora = metrics["methods"]["lora"]["macro_f1"]
    assert f"lora: val.h5ad, 70 cells, macro-F1 {lora:.3f}" in titles and len(titles) == len(metrics["methods"]) == 5


TWICE = """
import sys, torch
from scl.train.config import PretrainConfig
from scl.demo_cli import demo_file
from scl.train.pretrain import pretrain
weights = []
for name in ("a", "b"):
    model, _ = pretrain(PretrainConfig(data=[demo_file("pbmc_demo.h5ad"), demo_file("brain_demo.h5ad")], out=sys.argv[1] + name,
                                       gene_order=demo_file("scimilarity_gene_order.tsv"), hidden_dim=[64, 32], latent_dim=16,
                                       epochs=2, triplet_weight=0.5, seed=0), progress=False)
    weights.append(torch.cat([p.detach().flatten() for p in model.encoder.parameters()]))
print(torch.equal(*weights), float((weights[0] - weights[1]).abs().max()))
"""


def test_pretraining_twice_with_one_seed_gives_the_same_weights_bit_for_bit(tmp_path):
    """The demo's data on 2 threads: without deterministic kernels the weights differed (by ~1e-6) from run to run."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", TWICE, str(tmp_path / "base_")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "True", done.stdout


def test_pretrain_holds_out_cells_and_scl_train_calibrates_on_exactly_those(base_dir, run_dir, small_data, tmp_path):
    """pretrain.json names the held-out cells of each file by digest and obs position; scl-train, given the same file,
    calibrates on exactly those and trains on none of them. A base with no record (official weights): a stratified
    split, no warning, and the source says whether the base saw them is unknown."""
    import shutil

    from scl.runtime.expression import ReadOptions
    from scl.runtime.integrity import file_sha256
    from scl.train.data import load_labelled
    from scl.train.roles import split_calibration

    held = json.loads((base_dir / "pretrain.json").read_text())["held_out"]
    train_file = next(f for f in held["files"] if f["path"].endswith("train.h5ad"))
    assert held["share"] == 0.2 and train_file["sha256"] == file_sha256(str(small_data / "train.h5ad"))
    assert len(train_file["held_out_rows"]) == 42 and train_file["cells"] == 210  # 6 of each population's 30
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["cells"] == {"train": 168, "validation": 70, "calibration": 42}
    cal = metrics["calibration"]
    assert "held out" in cal["source"] and not cal["optimistic"] and set(cal["cells_per_class"].values()) == {6}
    assert "## Calibration" in (run_dir / "report.md").read_text() and (run_dir / "reliability.png").is_file()

    base = load_model_dir(base_dir)
    cells = load_labelled(str(small_data / "train.h5ad"), base.gene_order, "cell_type")
    config = FinetuneConfig(base_model=str(base_dir), data=str(small_data / "train.h5ad"), out="unused")
    split = split_calibration(cells, config, base.gene_order, ReadOptions())  # no --val-data: the held-out cells validate and calibrate
    assert sorted(np.concatenate([split.calibration.rows, split.validation.rows])) == sorted(train_file["held_out_rows"])
    assert not set(split.calibration.rows) & set(split.validation.rows) and not set(split.rest.rows) & set(train_file["held_out_rows"])
    assert len(split.rest) == 168 and len(split.calibration) == len(split.validation) == 21  # 3 + 3 of each population's 6
    assert set(np.unique(split.validation.labels, return_counts=True)[1]) == {3}
    with_val = split_calibration(cells, FinetuneConfig(base_model=str(base_dir), data=config.data, val_data=str(small_data / "val.h5ad"),
                                                       out="unused"), base.gene_order, ReadOptions())
    assert with_val.validation is None and sorted(with_val.calibration.rows) == sorted(train_file["held_out_rows"])

    official = tmp_path / "official"  # SCimilarity's own folder layout has no pretrain.json
    shutil.copytree(base_dir, official)
    (official / "pretrain.json").unlink()
    split = split_calibration(cells, FinetuneConfig(base_model=str(official), data=config.data, out="unused"), base.gene_order, ReadOptions())
    assert len(split.calibration) == 42 and not split.optimistic and "keeps no pretrain.json, so whether it saw them is unknown" in split.source


def test_a_base_that_saw_every_cell_warns_once_and_the_calibration_says_optimistic(small_data, tmp_path):
    base, out = tmp_path / "base", tmp_path / "run"
    code, _, stderr = run("scl-pretrain", "--data", small_data / "train.h5ad", "--out", base, "--hidden", "32", "--latent", "8",
                          "--epochs", "1", "--holdout", "0")
    assert code == 0, stderr
    code, stdout, stderr = run("scl-train", "--base-model", base, "--data", small_data / "train.h5ad", "--out", out, "--epochs", "1", "--quiet")
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if "calibration is optimistic" in line]
    assert len(warnings) == 1 and "pretrained on every cell of train.h5ad" in warnings[0] and "--holdout" in warnings[0]
    assert "OPTIMISTIC" in stdout and "OPTIMISTIC" in (out / "report.md").read_text()
    validation_warnings = [line for line in stderr.splitlines() if "validation (which picks the epoch) is optimistic" in line]
    n_val = json.loads((out / "metrics.json").read_text())["cells"]["validation"]
    assert len(validation_warnings) == 1 and f"on {n_val} of the {n_val} validation cells" in validation_warnings[0]
    report = (out / "report.md").read_text()
    assert report.index("**On cells no stage saw**") < report.index("## Validation")  # the honest number leads
    assert json.loads((out / "metrics.json").read_text())["validation"]["seen_by_base"] == n_val
    assert json.loads((out / "metrics.json").read_text())["calibration"]["optimistic"] is True
    code, _, stderr = run("scl-export", out, "--out", tmp_path / "m.onnx", "--sample-cells", "16")
    assert code == 0, stderr
    code, stdout, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", tmp_path / "m.onnx", "--output", tmp_path / "c.csv", "--alpha", "0.1")
    assert code == 0, stderr
    assert "calibration cells were in its base model's training data, so it is optimistic" in stdout


def test_training_keeps_the_best_epoch_stops_on_a_plateau_and_says_so():
    from scl.train.epoch_choice import EpochChoice, epoch_line

    choice, states = EpochChoice(patience=2), iter(range(100))
    stops = [choice.offer(e, f1, loss, lambda: next(states)) for e, (f1, loss) in
             enumerate([(0.5, 1.0), (0.8, 0.9), (0.8, 0.7), (0.8, 0.75), (0.79, 0.5)], start=1)]
    assert stops == [False, False, False, False, True]  # epoch 3 ties epoch 2 on macro-F1 and wins on loss; 4 and 5 bring nothing
    assert choice.epoch == 3 and choice.state == 2
    assert "stopped early after 5 of at most 10" in epoch_line({"best": 3, "run": 5, "max": 10, "patience": 2})
    assert "the best was the last of 5" in epoch_line({"best": 5, "run": 5, "max": 5, "patience": 3}) and "--epochs 10" in epoch_line({"best": 5, "run": 5, "max": 5, "patience": 3})
    assert epoch_line({"best": 2, "run": 5, "max": 5, "patience": 3}) == "epochs: kept epoch 2 of 5"


def test_cosine_schedule_warms_up_for_an_epoch_then_decays_to_zero():
    from scl.train.schedule import lr_schedule

    def rates(schedule, epochs=4, steps=5):
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler, seen = lr_schedule(optimizer, schedule, epochs, steps), []
        for _ in range(epochs * steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return np.array(seen)

    assert (rates("constant") == 1.0).all()
    cosine = rates("cosine")
    assert np.allclose(cosine[:5], [0.2, 0.4, 0.6, 0.8, 1.0])  # warm-up over the first epoch's steps
    assert (np.diff(cosine[5:]) < 0).all() and cosine[-1] < 0.02  # then down, to about zero at the last step


def test_recipe_seed_reproduces_the_seeds_settings_under_the_flags_given(base_dir, small_data, tmp_path):
    out = tmp_path / "seed_run"
    code, _, stderr = run("scl-train", "--base-model", base_dir, "--data", small_data / "train.h5ad", "--out", out, "--recipe", "seed",
                          "--epochs", "1", "--quiet")
    assert code == 0, stderr
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert (config["lr"], config["schedule"], config["epochs"]) == (1e-4, "constant", 1)  # the flag given wins over the recipe
    code, _, stderr = run("scl-train", "--base-model", base_dir, "--data", small_data / "train.h5ad", "--out", tmp_path / "x", "--schedule", "linear")
    assert code == 2 and "'linear' is not one of 'constant', 'cosine'" in stderr
    with pytest.raises(SclError, match="--schedule 'linear': choose one of constant, cosine"):
        finetune(FinetuneConfig(base_model=str(base_dir), data=str(small_data / "train.h5ad"), out=str(tmp_path / "y"), schedule="linear"))
