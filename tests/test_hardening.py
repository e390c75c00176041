"""Wrong answers without a word, found by trying scl as a careless user would (issue 21): each case here gave a
silently wrong result or a traceback before."""

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scl
from scl.runtime.errors import SclError

from conftest import run


@pytest.fixture(scope="module")
def annotator(exported):
    return scl.Annotator(exported)


def test_annotating_twice_under_one_key_replaces_every_column(annotator, pbmc_small):
    adata = pbmc_small.copy()
    scl.annotate(adata, annotator, alpha=0.1, majority_voting=True, progress=False)
    assert {"scl_prediction_set", "scl_set_size", "scl_majority_label"} <= set(adata.obs)
    scl.annotate(adata, annotator, min_confidence=0.99, progress=False)
    assert not {"scl_prediction_set", "scl_set_size", "scl_majority_label", "scl_cluster", "scl_majority_share"} & set(adata.obs)
    fresh = scl.annotate(pbmc_small.copy(), annotator, min_confidence=0.99, copy=True, progress=False)
    assert [c for c in adata.obs if c.startswith("scl_")] == [c for c in fresh.obs if c.startswith("scl_")]
    assert (adata.obs["scl_label"] == fresh.obs["scl_label"]).all()


def test_to_adata_aligns_on_cell_names_or_refuses(annotator, pbmc_small):
    result = annotator.annotate(pbmc_small, progress=False)
    shuffled = pbmc_small[np.random.default_rng(0).permutation(pbmc_small.n_obs)].copy()
    result.to_adata(shuffled)
    expected = pd.Series(result.predicted_labels, index=result.cell_ids)
    assert (shuffled.obs["scl_label"].astype(str) == expected[shuffled.obs_names].to_numpy()).all()
    np.testing.assert_array_equal(shuffled.obsm["X_scl"], result.embedding[[list(result.cell_ids).index(c) for c in shuffled.obs_names]])
    other = pbmc_small.copy()
    other.obs_names = [f"x{i}" for i in range(other.n_obs)]
    with pytest.raises(SclError, match="among them 'x0' that the result lacks"):
        result.to_adata(other)
    with pytest.raises(SclError, match="the result holds 119 cells but the AnnData 30"):
        result.to_adata(pbmc_small[:30].copy())


def test_over_clustering_aligns_a_series_on_obs_names_and_leaves_unclustered_cells_out(annotator, pbmc_small):
    adata = pbmc_small.copy()
    clusters = pd.Series(adata.obs["cell_type"].astype(str).to_numpy(), index=adata.obs_names)
    by_name = annotator.annotate(adata, over_clustering=clusters.sample(frac=1, random_state=0), progress=False)
    in_order = annotator.annotate(adata, over_clustering=clusters.to_numpy(), progress=False)
    assert (by_name.calls["majority_label"] == in_order.calls["majority_label"]).all()
    assert (by_name.calls["cluster"] == adata.obs["cell_type"].astype(str).to_numpy()).all()
    with pytest.raises(SclError, match="the Series' index does not name the cells"):
        annotator.annotate(adata, over_clustering=pd.Series(clusters.to_numpy(), index=[f"x{i}" for i in range(adata.n_obs)]), progress=False)
    adata.obs["leiden"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 4 == 0, None, adata.obs["cell_type"].astype(str)))
    result = annotator.annotate(adata, over_clustering="leiden", progress=False)
    unclustered = adata.obs["leiden"].isna().to_numpy()
    assert (result.calls["majority_label"][unclustered] == "unclustered").all() and (result.calls["cluster"][unclustered] == "").all()
    assert np.isnan(result.calls["majority_share"][unclustered]).all()
    assert "nan" not in set(result.calls["cluster"]) and "unclustered" not in set(result.calls["majority_label"][~unclustered])
    votes = result.report["majority_voting"]
    assert votes["unclustered_cells"] == unclustered.sum() and votes["clusters"] == 7


def test_min_share_is_checked_before_the_work_and_warned_about_when_unused(annotator, exported, pbmc_small, small_data, tmp_path, caplog):
    for bad in (2, "0.5", -0.1, True):
        with pytest.raises(SclError, match=r"min_share .*: give a share between 0 and 1"):
            annotator.annotate(pbmc_small, majority_voting=True, min_share=bad, progress=False)
    with caplog.at_level(logging.WARNING, logger="scl"):
        annotator.annotate(pbmc_small[:20], min_share=0.8, progress=False)
    assert "min_share 0.8 is ignored" in caplog.text
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--output", tmp_path / "o.csv", "--majority-voting",
                          "--min-share", "2", "--quiet")
    assert code == 1 and "min_share 2.0: give a share between 0 and 1" in stderr and not (tmp_path / "o.csv").exists()
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--output", tmp_path / "o.csv", "--min-share", "0.7", "--quiet")
    assert code == 0 and "min_share 0.7 is ignored" in stderr


@pytest.mark.parametrize("key_added", [5, "", None])
def test_a_bad_key_added_is_refused_before_any_work(annotator, pbmc_small, key_added):
    with pytest.raises(SclError, match="key_added .*: give a non-empty string"):
        scl.annotate(pbmc_small.copy(), annotator, key_added=key_added, progress=False)


def test_two_classes_train_and_a_finished_run_is_refused_before_training(base_dir, small_data, tmp_path):
    cells = ad.read_h5ad(small_data / "train.h5ad")
    two = cells[cells.obs["cell_type"].isin(["B", "NK"])].copy()
    two.write_h5ad(tmp_path / "two.h5ad")
    code, stdout, stderr = run("scl-train", "--base-model", base_dir, "--data", tmp_path / "two.h5ad", "--out", tmp_path / "run",
                               "--epochs", "1", "--quiet")
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["methods"]["lora"]["top3"] == 1.0  # of two classes, the true one is always among the top 3
    code, _, stderr = run("scl-train", "--base-model", base_dir, "--data", tmp_path / "two.h5ad", "--out", tmp_path / "run", "--epochs", "1")
    assert code == 1 and "already holds a finished run" in stderr and "(see --out)" in stderr
    assert "LoRA" not in stderr  # refused before training began: no progress bar


def test_a_run_that_fails_after_training_leaves_no_run_folder_and_out_must_be_new(base_dir, small_data, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    code, _, stderr = run("scl-train", "--base-model", base_dir, "--data", small_data / "train.h5ad", "--out", full, "--epochs", "1")
    assert code == 1 and "already holds files" in stderr and "LoRA" not in stderr  # refused before training
    code, _, stderr = run("scl-pretrain", "--data", small_data / "train.h5ad", "--out", full, "--epochs", "1")
    assert code == 1 and "already holds files; scl-pretrain writes a new folder" in stderr and "pretrain" not in stderr.split("Error")[0]
    code, _, stderr = run("scl-pretrain", "--data", small_data / "train.h5ad", "--out", base_dir, "--epochs", "1")
    assert code == 1 and "already holds a model (encoder.ckpt)" in stderr
    assert [p.name for p in full.iterdir()] == ["notes.txt"] and (full / "notes.txt").read_text() == "mine"
    # the forgetting cells are read after training, while the run folder is being written: it fails whole
    code, _, stderr = run("scl-train", "--base-model", base_dir, "--data", small_data / "train.h5ad", "--val-data", small_data / "val.h5ad",
                          "--forgetting-data", small_data / "brain.h5ad", "--forgetting-label-key", "no_such_column",
                          "--out", tmp_path / "run", "--epochs", "1", "--quiet")
    assert code == 1 and "no_such_column" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no run folder, whole or half, and no temporary one


def test_odd_python_inputs_give_the_same_calls_or_one_line(annotator, pbmc_small):
    from fractions import Fraction

    dense = pbmc_small.X.toarray()
    genes = list(pbmc_small.var_names)
    expected = annotator.annotate(dense, genes=genes, progress=False).predicted_labels
    assert (annotator.annotate(np.asmatrix(dense), genes=genes, progress=False).predicted_labels == expected).all()
    frame = pd.DataFrame(dense.astype(np.int64), columns=genes, index=pbmc_small.obs_names).astype("Int64")
    assert (annotator.annotate(frame, progress=False).predicted_labels == expected).all()
    frame.iloc[3, 5] = pd.NA
    with pytest.raises(SclError, match=f"{pbmc_small.obs_names[3]}"):
        annotator.annotate(frame, progress=False)
    labelled = pd.DataFrame(dense, columns=genes, index=pbmc_small.obs_names).assign(donor="d1")
    with pytest.raises(SclError, match="column 'donor' holds object values, not numbers"):
        annotator.annotate(labelled, progress=False)
    with pytest.raises(SclError, match="are not numbers"):
        annotator.annotate(dense.astype(str), genes=genes, progress=False)
    by_fraction = annotator.annotate(dense, genes=genes, alpha=Fraction(1, 20), progress=False)
    by_float = annotator.annotate(dense, genes=genes, alpha=0.05, progress=False)
    assert (by_fraction.calls["prediction_set"] == by_float.calls["prediction_set"]).all() and by_fraction.report["prediction_sets"]["alpha"] == 0.05
    with pytest.raises(SclError, match="over_clustering 0: give an obs column name or one cluster id per cell"):
        annotator.annotate(pbmc_small, over_clustering=0, progress=False)


def test_export_refuses_a_run_whose_calibration_went_missing(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "calibration.json").unlink()
    code, _, stderr = run("scl-export", copy, "--out", tmp_path / "m.onnx")
    assert code == 1 and "calibration.json is missing, though metrics.json records a calibration" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def split_entries(x):
    """The same counts with each row's entries split in two and the order reversed: a non-canonical CSR matrix
    (repeated (cell, gene) entries, unsorted indices) that scipy reads as the same matrix."""
    from scipy import sparse

    x = sparse.csr_matrix(x)
    data, indices, indptr = [], [], [0]
    for row in range(x.shape[0]):
        lo, hi = x.indptr[row], x.indptr[row + 1]
        values, genes = x.data[lo:hi][::-1], x.indices[lo:hi][::-1]
        half = np.floor(values / 2)
        data += [*half[half > 0], *(values - half)]
        indices += [*genes[half > 0], *genes]
        indptr.append(len(data))
    split = sparse.csr_matrix((np.array(data, np.float32), np.array(indices), np.array(indptr)), shape=x.shape)
    assert not split.has_canonical_format and abs(split - x).max() == 0
    return split


def test_repeated_sparse_entries_are_summed_in_memory_and_in_files(annotator, pbmc_small, tmp_path):
    canonical = annotator.annotate(pbmc_small, progress=False)
    messy = pbmc_small.copy()
    messy.X = split_entries(pbmc_small.X)
    in_memory = annotator.annotate(messy, progress=False)
    path = tmp_path / "messy.h5ad"
    messy.write_h5ad(path)
    from_file = annotator.annotate(str(path), progress=False)
    for result in (in_memory, from_file):
        assert (result.calls["genes_detected"] == canonical.calls["genes_detected"]).all()
        assert (result.predicted_labels == canonical.predicted_labels).all()
        np.testing.assert_allclose(result.embedding, canonical.embedding, atol=1e-5)
    assert messy.X.nnz > pbmc_small.X.nnz  # the input's own arrays are left as they were


def test_a_backed_view_is_annotated_as_its_cells_in_its_order(annotator, pbmc_path, tmp_path):
    in_memory = annotator.annotate(ad.read_h5ad(pbmc_path), progress=False)
    label_of = dict(zip(in_memory.cell_ids, in_memory.predicted_labels))
    dense = ad.read_h5ad(pbmc_path)[::4].copy()
    dense.X = dense.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    spread = np.random.default_rng(0).choice(700, 40, replace=False)  # unsorted, over the file: read in runs
    for path in (pbmc_path, tmp_path / "dense.h5ad"):
        backed = ad.read_h5ad(path, backed="r")
        for view in (backed[backed.obs.cell_type == "NK"], backed[[5, 3, 1]], backed[spread], backed[: 2 * 256 + 7]):
            result = annotator.annotate(view, progress=False)
            assert list(result.cell_ids) == list(view.obs_names)
            assert [label_of[c] for c in result.cell_ids] == list(result.predicted_labels)
    backed = ad.read_h5ad(pbmc_path, backed="r")
    with pytest.raises(SclError, match="keeps 100 of the file's 8,846 genes"):
        annotator.annotate(backed[:, :100], progress=False)
    with pytest.raises(SclError, match="the view holds no cells"):
        annotator.annotate(backed[backed.obs.cell_type == "none"], progress=False)
    for view, copy in ((backed[[5, 3, 1]], False), (backed, True)):
        with pytest.raises(SclError, match="anndata cannot copy backed data without a file"):
            scl.annotate(view, annotator, copy=copy, progress=False)
    scl.annotate(backed, annotator, progress=False)  # in place on the whole backed object: obs is in memory
    assert (backed.obs["scl_label"].to_numpy() == in_memory.predicted_labels).all()


def test_a_narrow_input_is_held_to_the_share_of_genes_it_can_show(exported, pbmc_path, tmp_path):
    """The 500 most variable genes of real PBMCs (485 in the model): cells express a median of about 190 of them.
    Held to 200, most would be unassigned for the input's width; the rule scales with the genes the input holds."""
    adata = ad.read_h5ad(pbmc_path)[::5]
    x = adata.X.toarray()
    logged = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    narrow = adata[:, np.sort(np.argsort(-logged.var(0))[:500])].copy()
    narrow.write_h5ad(tmp_path / "narrow.h5ad")
    outcomes = {}
    for name, extra in (("default", ()), ("at_200", ("--min-cell-genes", 200))):
        out, report = tmp_path / f"{name}.csv", tmp_path / f"{name}.json"
        code, stdout, stderr = run("scl-annotate", tmp_path / "narrow.h5ad", "--model", exported, "--output", out, "--report", report, "--min-genes", 100, *extra)
        assert code == 0, stderr
        outcomes[name] = (pd.read_csv(out, keep_default_na=False), json.loads(report.read_text()), stdout)
    calls, report, stdout = outcomes["default"]
    assert report["input"]["genes"]["matched"] == 485 and report["min_cell_genes"] == 20
    assert (calls["genes_detected"] >= 20).all() and (calls["label"] != "unassigned").all() and "few_genes" not in report["unassigned"]
    calls, report, stdout = outcomes["at_200"]
    short = calls["genes_detected"] < 200
    assert short.mean() > 0.3  # what the unscaled rule did to this input
    assert (calls.loc[short, "unassigned_reason"] == "few_genes").all() and (calls.loc[short, "label"] == "unassigned").all()
    assert (calls.loc[~short, "unassigned_reason"] == "").all()
    assert report["unassigned"]["few_genes"] == {"cells": int(short.sum()), "setting": "min_cell_genes",
                                                 "rule": "fewer than 200 of the 485 model genes this input holds are expressed"}
    assert f"unassigned: {int(short.sum()):,} few_genes (fewer than 200 of the 485 model genes this input holds are expressed), see --min-cell-genes" in stdout


def test_a_cells_novelty_p_is_one_number_and_alpha_messages_hold_at_the_extremes(annotator, pbmc_small):
    results = {alpha: annotator.annotate(pbmc_small, alpha=alpha, progress=False) for alpha in (0.001, 0.05, 0.2, 0.5, 0.999)}
    p = results[0.05].calls["novelty_p"]
    for alpha, result in results.items():
        np.testing.assert_array_equal(result.calls["novelty_p"], p)  # alpha decides what is novel, not the p-value
        assert (result.calls["novel"] == (p <= alpha)).all()
    cells = annotator.session.calibration.cells
    assert cells < 999  # so that alpha 0.001 is below what the calibration supports
    tiny = results[0.001].report["prediction_sets"]
    assert tiny["promise"].startswith(f"the model's {cells:,} calibration cells support alpha {1 / (cells + 1):.2g} or more")
    assert tiny["every_class"] == 1.0 and tiny["smallest_alpha"] == round(1 / (cells + 1), 6)
    assert "at least 0.1% of cells" in results[0.999].report["prediction_sets"]["promise"]
    assert "at least 95% of cells" in results[0.05].report["prediction_sets"]["promise"]


def test_training_roles_that_share_cells_are_refused_by_cell_identity(base_dir, small_data, tmp_path):
    from scl.runtime.expression import ReadOptions
    from scl.train.data import load_labelled
    from scl.train.model_dir import load_model_dir
    from scl.train.roles import refuse_shared_cells

    data = small_data / "train.h5ad"
    copy = ad.read_h5ad(data)
    copy.obs["note"] = "one more column, so another file digest"
    copy[::3].copy().write_h5ad(tmp_path / "some_of_the_same_cells.h5ad")
    for flag, other in (("--val-data", data), ("--calibration-data", data), ("--calibration-data", tmp_path / "some_of_the_same_cells.h5ad")):
        code, _, stderr = run("scl-train", "--base-model", base_dir, "--data", data, flag, other, "--out", tmp_path / "run", "--epochs", "1")
        last = stderr.strip().splitlines()[-1]
        assert code == 1 and last.startswith("Error: the training cells") and "each cell may serve one role" in last, stderr
        assert not (tmp_path / "run").exists()
    cells = load_labelled(str(data), load_model_dir(base_dir).gene_order, "cell_type", ReadOptions())
    same_names = cells.subset(np.arange(10))
    same_names.cell_ids = cells.cell_ids[10:20]  # other cells that happen to carry these names (barcodes repeat across samples)
    refuse_shared_cells([("training", cells.subset(np.arange(10, len(cells))), "a"), ("validation", same_names, "b")])
    with pytest.raises(SclError, match="share 10 cells"):
        refuse_shared_cells([("training", cells, "a"), ("validation", cells.subset(np.arange(10)), "b")])
