"""The head scl-train ships: the fine-tuned embedding and marker genes (train/head.py), through the run folder, the
ONNX graph and the runtime; and the head LoRA trained alone (--head-genes 0, and runs from before the marker genes)."""

import json
import shutil

import anndata as ad
import numpy as np
import onnx
import torch

from scl.export.graph import annotation_model
from scl.train.run_dir import load_run

from conftest import run

# Each population's textbook markers (a B cell's immunoglobulin complex, CD8, the monocyte alarmins, NK granules)
KNOWN_MARKERS = {"B": {"CD79A", "CD79B", "MS4A1", "CD74", "HLA-DRA"}, "CD8TN": {"CD8A", "CD8B"},
                 "Monocyte": {"S100A8", "S100A9", "LYZ", "CST3"}, "NK": {"GNLY", "NKG7", "GZMB", "PRF1"}}


def test_the_head_weighs_each_population_s_known_markers(run_dir):
    """Marker selection and the head's fit on 30 real cells per population: each population's five most weighted
    genes include one of its textbook markers."""
    strongest = json.loads((run_dir / "metrics.json").read_text())["head"]["strongest_genes"]
    for population, markers in KNOWN_MARKERS.items():
        assert markers & set(strongest[population]), (population, strongest[population])


def test_the_graph_computes_embedding_and_marker_gene_logits(exported, run_dir):
    """The exported probabilities equal softmax((W z + b + W_g log1p(CP10k)[genes]) / T), computed here in numpy from
    head.pt itself; the graph reads the marker genes (a cell without them gets other probabilities)."""
    import onnxruntime as ort

    state = torch.load(run_dir / "head.pt", weights_only=True)
    temperature = json.loads((run_dir / "calibration.json").read_text())["temperature"]
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    counts = np.random.default_rng(3).poisson(0.3, size=(40, 28231)).astype(np.float32)
    genes = state["gene_index"].numpy()
    counts[:, genes] += np.random.default_rng(4).poisson(2.0, size=(40, len(genes)))
    probs, emb = session.run(None, {"counts": counts, "input_is_lognorm": np.zeros(1, np.float32)})
    lognorm = np.log1p(counts * 1e4 / counts.sum(1, keepdims=True))
    logits = emb @ state["weight"].numpy().T + state["bias"].numpy() + lognorm[:, genes] @ state["gene_weight"].numpy().T
    expected = np.exp(logits / temperature - (logits / temperature).max(1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-4)
    without = counts.copy()
    without[:, genes] = 0
    assert np.abs(session.run(None, {"counts": without, "input_is_lognorm": np.zeros(1, np.float32)})[0] - probs).max() > 0.05
    names = json.loads(next(p.value for p in onnx.load(str(exported)).metadata_props if p.key == "scl.head_genes"))
    gene_order = load_run(run_dir).model.gene_order
    assert names == [gene_order[i] for i in genes]


def test_head_genes_0_ships_the_head_lora_trained(base_dir, small_data, tmp_path):
    """--head-genes 0: head.pt holds the embedding head LoRA trained (no genes); the export reads no genes and carries no
    scl.head_genes; its probabilities are softmax(head(embedding) / T)."""
    out = tmp_path / "run"
    code, stdout, stderr = run("scl-train", "--base-model", base_dir, "--data", small_data / "train.h5ad", "--val-data", small_data / "val.h5ad",
                               "--out", out, "--epochs", "1", "--head-genes", "0", "--quiet")
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head"]["genes"] == 0 and set(metrics["methods"]) == {"base+linear", "base+knn", "lora"}
    state = torch.load(out / "head.pt", weights_only=True)
    assert len(state["gene_index"]) == 0 and state["gene_weight"].shape == (7, 0)
    code, _, stderr = run("scl-export", out, "--out", tmp_path / "m.onnx", "--sample-cells", "20")
    assert code == 0, stderr
    assert "scl.head_genes" not in {p.key for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}


def test_a_run_from_before_marker_genes_loads_and_exports(run_dir, tmp_path):
    """A head.pt of the old form (weight, bias, centroids) is the embedding head: it loads, exports and validates."""
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old)
    state = torch.load(old / "head.pt", weights_only=True)
    torch.save({k: state[k] for k in ("weight", "bias", "centroids")}, old / "head.pt")
    trained = load_run(old)
    assert len(trained.head.gene_index) == 0
    z = torch.nn.functional.normalize(torch.randn(5, trained.head.latent_dim), dim=1)
    np.testing.assert_allclose(annotation_model(trained).head(z).detach().numpy() * trained.calibration.temperature,
                               (z @ state["weight"].T + state["bias"]).numpy(), atol=1e-5)
    code, _, stderr = run("scl-export", old, "--out", tmp_path / "old.onnx", "--sample-cells", "20")
    assert code == 0, stderr


def test_a_head_pt_whose_genes_do_not_fit_is_refused(run_dir, tmp_path):
    damaged = tmp_path / "run"
    shutil.copytree(run_dir, damaged)
    state = torch.load(damaged / "head.pt", weights_only=True)
    torch.save(state | {"gene_index": state["gene_index"] + 10**6}, damaged / "head.pt")
    code, _, stderr = run("scl-export", damaged, "--out", tmp_path / "m.onnx")
    assert code != 0 and "head.pt reads genes outside the model's 28,231" in stderr
    torch.save(state | {"gene_weight": state["gene_weight"][:, :3]}, damaged / "head.pt")
    code, _, stderr = run("scl-export", damaged, "--out", tmp_path / "m.onnx")
    assert code != 0 and "not the head scl-train writes" in stderr and not (tmp_path / "m.onnx").exists()


def test_a_file_without_the_head_s_marker_genes_is_named(exported, small_data, tmp_path):
    """Dropping the head's marker genes from a file: one warning naming how many are missing, and the report says so;
    with every gene there, no warning."""
    names = json.loads(next(p.value for p in onnx.load(str(exported)).metadata_props if p.key == "scl.head_genes"))
    val = ad.read_h5ad(small_data / "val.h5ad")
    kept = [g for g in val.var_names if g not in set(names[: len(names) // 2])]
    val[:, kept].copy().write_h5ad(tmp_path / "few.h5ad")
    missing_here = len(set(names) - set(kept))
    code, stdout, stderr = run("scl-annotate", tmp_path / "few.h5ad", "--model", exported, "--output", tmp_path / "few.csv", "--report", tmp_path / "r.json")
    assert code == 0, stderr
    genes = json.loads((tmp_path / "r.json").read_text())["input"]["genes"]
    assert genes["head_genes"] == len(names) and genes["head_genes_missing"] == missing_here > 0.1 * len(names)
    assert f"lacks {missing_here:,} of the {len(names):,} marker genes the model's head reads" in stderr
    assert f"the head's marker genes missing {missing_here:,} of {len(names):,}" in stdout
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--output", tmp_path / "all.csv")
    assert code == 0 and "marker genes the model's head reads" not in stderr


def test_training_s_sparse_logits_equal_the_head_module(run_dir, small_data):
    """head_logits (calibration and validation, on sparse rows) and the CellHead module (the exported graph) agree."""
    import scipy.sparse as sp

    from scl.train.data import load_labelled
    from scl.train.head import head_logits

    trained = load_run(run_dir)
    cells = load_labelled(str(small_data / "val.h5ad"), trained.model.gene_order, "cell_type")
    with torch.no_grad():
        z = trained.model.encoder.eval()(torch.from_numpy(cells.x.toarray())).numpy()
        module = trained.head(torch.from_numpy(z), torch.from_numpy(cells.x.toarray())).numpy()
    assert sp.issparse(cells.x) and len(trained.head.gene_index)
    np.testing.assert_allclose(head_logits(trained.head, z, cells.x), module, rtol=1e-5, atol=1e-4)
