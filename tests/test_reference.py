"""References: built from real h5ad files with the exported model, searched exactly and with hnswlib, voting in
scl-annotate, the Python API and the server alike, refused with another model or when tampered with."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scl
from fastapi.testclient import TestClient

from scl.runtime.annotator import Annotator
from scl.runtime.errors import SclError
from scl.runtime.reference import Reference
from scl.runtime.serve import create_app

from conftest import run

KNN = ["knn_label", "knn_share", "knn_second_label", "knn_min_dist", "knn_novelty_p", "knn_novel", "knn_agrees"]


@pytest.fixture(scope="module")
def annotator(exported):
    return Annotator(exported)


@pytest.fixture(scope="module")
def reference_dir(exported, small_data, tmp_path_factory):
    """A reference built by the command line from the training cells, keeping a study column."""
    cells = ad.read_h5ad(small_data / "train.h5ad")
    cells.obs["study"] = np.where(np.arange(cells.n_obs) % 2, "even", "odd")
    folder = tmp_path_factory.mktemp("reference")
    cells.write_h5ad(folder / "train_with_study.h5ad")
    out = folder / "train.sclref"
    code, stdout, stderr = run("scl-reference", "build", folder / "train_with_study.h5ad", "--model", exported, "--label-key", "cell_type",
                               "--keep-obs", "study", "--out", out, "--quiet")
    assert code == 0, stderr
    return out


def halves(small_data, tmp_path) -> tuple[str, str, int, int]:
    """The training cells as two files, in order: their paths, the first's cells and all cells."""
    cells = ad.read_h5ad(small_data / "train.h5ad")
    half = cells.n_obs // 2
    cells[:half].copy().write_h5ad(tmp_path / "a.h5ad")
    cells[half:].copy().write_h5ad(tmp_path / "b.h5ad")
    return str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad"), half, cells.n_obs


def test_two_files_build_the_reference_their_concatenation_builds(annotator, small_data, tmp_path):
    a_file, b_file, half, n_cells = halves(small_data, tmp_path)
    two = Reference.build([a_file, b_file], annotator, progress=False)
    one = Reference.build(str(small_data / "train.h5ad"), annotator, progress=False)
    assert two.cells.ids.tolist() == one.cells.ids.tolist() and two.labels == one.labels
    assert np.array_equal(two.cells.labels, one.cells.labels) and len(one) + one.card["holdout"]["cells"] == n_cells
    np.testing.assert_allclose(two.index.vectors(), one.index.vectors(), atol=1e-6)
    assert two.card["holdout"]["distances_by_label"] == one.card["holdout"]["distances_by_label"]
    assert [f["cells"] for f in two.card["files"]] == [half, n_cells - half]
    query = annotator.embed(str(small_data / "val.h5ad"), progress=False)
    a, b = two.calls(query), one.calls(query)
    assert a["knn_label"].tolist() == b["knn_label"].tolist()
    np.testing.assert_allclose(a["knn_share"], b["knn_share"], atol=1e-5)


def test_hnsw_search_finds_what_exact_search_finds(annotator, small_data):
    exact = Reference.build(str(small_data / "train.h5ad"), annotator, index="exact", progress=False)
    graph = Reference.build(str(small_data / "train.h5ad"), annotator, index="hnsw", progress=False)
    assert exact.index.kind == "exact" and graph.index.kind == "hnsw"
    query = annotator.embed(str(small_data / "val.h5ad"), progress=False)
    (e_rows, e_dist), (g_rows, g_dist) = exact.search(query, 50), graph.search(query, 50)
    recall = np.mean([len(np.intersect1d(a, b)) / 50 for a, b in zip(e_rows, g_rows)])
    assert recall >= 0.99, recall
    assert (np.diff(e_dist, axis=1) >= -1e-7).all() and (np.diff(g_dist, axis=1) >= -1e-7).all()  # nearest first
    np.testing.assert_allclose(e_dist[:, 0], g_dist[:, 0], atol=1e-5)
    # the distances are cosine distances of the stored embeddings
    np.testing.assert_allclose(e_dist[:, 0], 1 - np.sum(query * exact.index.vectors()[e_rows[:, 0]], axis=1), atol=1e-5)


def test_knn_calls_are_the_same_from_the_cli_the_api_and_the_server(exported, small_data, reference_dir, tmp_path):
    out = tmp_path / "calls.csv"
    code, stdout, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--reference", reference_dir, "-k", "20",
                               "--output", out)
    assert code == 0, stderr
    assert "neighbours: k 20 of" in stdout
    cli = pd.read_csv(out, keep_default_na=False)
    assert [c for c in cli.columns if c.startswith("knn_")] == KNN
    api = Annotator(exported).annotate(ad.read_h5ad(small_data / "val.h5ad"), reference=str(reference_dir), k=20, progress=False)
    frame = api.to_frame()
    adata = ad.read_h5ad(small_data / "val.h5ad")
    scl.annotate(adata, exported, reference=Reference.load(reference_dir), k=20, progress=False)
    assert adata.obs["scl_knn_label"].astype(str).tolist() == cli["knn_label"].tolist()
    assert frame["knn_label"].astype(str).tolist() == cli["knn_label"].tolist()
    np.testing.assert_allclose(frame["knn_share"], cli["knn_share"], atol=1e-4)
    assert api.report["neighbours"]["k"] == 20 and api.report["neighbours"]["cells"] == len(Reference.load(reference_dir))
    cells = ad.read_h5ad(small_data / "val.h5ad")
    client = TestClient(create_app(Annotator(exported, session_threads=0), reference=Reference.load(reference_dir)))
    body = {"genes": list(cells.var_names), "values": cells.X.toarray().tolist(), "cell_ids": list(cells.obs_names), "k": 20}
    served = client.post("/predict_batch", json=body).json()["cells"]
    assert [c["knn_label"] for c in served] == cli["knn_label"].tolist()
    np.testing.assert_allclose([c["knn_min_dist"] for c in served], cli["knn_min_dist"], atol=1e-4)
    assert all(isinstance(c["knn_agrees"], bool) for c in served)
    # the head and the neighbours are two opinions on the same real cells: on this easy split they mostly agree
    assert (cli["knn_agrees"].astype(str) == "True").mean() > 0.5
    bare = TestClient(create_app(Annotator(exported, session_threads=0)))
    refused = bare.post("/predict_batch", json=body)
    assert refused.status_code == 422 and "--reference" in refused.json()["detail"]


def test_the_h5ad_output_holds_the_knn_columns_and_a_run_without_the_reference_drops_them(exported, small_data, reference_dir, tmp_path):
    out = tmp_path / "val.scl.h5ad"
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--reference", reference_dir, "--output", out, "--quiet")
    assert code == 0, stderr
    obs = ad.read_h5ad(out).obs
    assert set(obs["scl_knn_label"]) <= set(Reference.load(reference_dir).labels)
    assert obs["scl_knn_min_dist"].between(0, 2).all() and json.loads(ad.read_h5ad(out).uns["scl"]["report_json"])["neighbours"]["k"] == 50
    code, _, stderr = run("scl-annotate", out, "--model", exported, "--output", tmp_path / "again.h5ad", "--quiet")
    assert code == 0, stderr
    assert not [c for c in ad.read_h5ad(tmp_path / "again.h5ad").obs.columns if "knn" in c]


def test_a_reference_is_refused_with_another_model_in_one_line(exported, small_data, reference_dir, tmp_path):
    int8 = exported.with_name("model.int8.onnx")
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", int8, "--reference", reference_dir, "--output", tmp_path / "x.csv")
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and "content digests differ" in stderr
    assert not (tmp_path / "x.csv").exists()
    with pytest.raises(SclError, match="build the reference"):
        Annotator(int8).annotate(str(small_data / "val.h5ad"), reference=str(reference_dir), progress=False)


def test_a_tampered_or_foreign_reference_is_refused_and_nothing_is_replaced(exported, small_data, reference_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy.sclref"
    shutil.copytree(reference_dir, copy)
    cells = copy / "cells.h5"
    data = bytearray(cells.read_bytes())
    data[-100] ^= 0xFF
    cells.write_bytes(bytes(data))
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--reference", copy, "--output", tmp_path / "x.csv")
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and "changed since the reference was built" in stderr
    (copy / "reference.json").write_text("{not json")
    with pytest.raises(SclError, match="damaged"):
        Reference.load(copy)
    with pytest.raises(SclError, match="not a reference"):
        Reference.load(tmp_path)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    code, _, stderr = run("scl-reference", "build", small_data / "val.h5ad", "--model", exported, "--out", keep, "--overwrite", "--quiet")
    assert code == 1 and "not a reference folder" in stderr and (keep / "notes.txt").read_text() == "mine"
    code, _, stderr = run("scl-reference", "build", small_data / "val.h5ad", "--model", exported, "--out", reference_dir, "--quiet")
    assert code == 1 and "--overwrite" in stderr
    assert not [p for p in tmp_path.iterdir() if ".scl-tmp-" in p.name] and not [p for p in reference_dir.parent.iterdir() if ".scl-tmp-" in p.name]


def test_search_gives_the_nearest_reference_cells_per_cell_and_per_group(exported, small_data, reference_dir, tmp_path):
    hits = tmp_path / "hits.csv"
    code, _, stderr = run("scl-reference", "search", small_data / "val.h5ad", "--reference", reference_dir, "--model", exported, "-k", "7",
                          "--output", hits, "--quiet")
    assert code == 0, stderr
    table = pd.read_csv(hits)
    assert list(table.columns) == ["query", "rank", "cell_id", "distance", "label", "study"]
    val = ad.read_h5ad(small_data / "val.h5ad")
    assert len(table) == 7 * val.n_obs and table["query"].unique().tolist() == val.obs_names.tolist()
    assert (table.groupby("query")["distance"].apply(lambda d: (np.diff(d.to_numpy()) >= -1e-6).all())).all()
    ref = Reference.load(reference_dir)
    rows, _ = ref.search(Annotator(exported).embed(val, progress=False)[:1], 7)
    assert table["cell_id"][:7].tolist() == ref.cells.ids[rows[0]].tolist()
    assert set(table["study"]) <= {"odd", "even"}
    code, stdout, stderr = run("scl-reference", "search", small_data / "val.h5ad", "--reference", reference_dir, "--model", exported, "-k", "5",
                               "--by", "cell_type", "--output", tmp_path / "groups.csv")
    assert code == 0, stderr
    groups = pd.read_csv(tmp_path / "groups.csv")
    assert sorted(groups["query"].unique()) == sorted(val.obs["cell_type"].astype(str).unique()) and len(groups) == 5 * val.obs["cell_type"].nunique()
    assert "hits by label" in stdout and "hits by study" in stdout
    code, _, stderr = run("scl-reference", "search", small_data / "val.h5ad", "--reference", reference_dir, "--model", exported,
                          "--by", "no_such_column", "--output", tmp_path / "bad.csv")
    assert code == 1 and "no column 'no_such_column'" in stderr and not (tmp_path / "bad.csv").exists()


def test_an_encoder_only_export_annotates_by_neighbours_and_refuses_what_needs_a_head(base_dir, small_data, tmp_path):
    model = tmp_path / "base.onnx"
    code, stdout, stderr = run("scl-export", base_dir, "--out", model, "--sample-data", small_data / "train.h5ad", "--sample-cells", "64")
    assert code == 0, stderr
    assert "encoder only" in stdout and json.loads((tmp_path / "base.onnx.validation.json").read_text())["max_abs_diff_embedding"] < 1e-4
    base = Annotator(model)
    assert base.classes == [] and base.embed(str(small_data / "val.h5ad"), progress=False).shape == (70, 16)
    ref = tmp_path / "base.sclref"
    code, _, stderr = run("scl-reference", "build", small_data / "train.h5ad", "--model", model, "--out", ref, "--quiet")
    assert code == 0, stderr
    out = tmp_path / "calls.csv"
    code, stdout, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", model, "--reference", ref, "--output", out)
    assert code == 0, stderr
    calls = pd.read_csv(out, keep_default_na=False)
    assert list(calls.columns) == ["cell_id", "genes_detected"] + [c for c in KNN if c != "knn_agrees"]
    truth = ad.read_h5ad(small_data / "val.h5ad").obs["cell_type"].astype(str).to_numpy()
    assert (calls["knn_label"].to_numpy() == truth).mean() > 1 / 7  # better than chance, on a 2-epoch base
    result = base.annotate(str(small_data / "val.h5ad"), reference=str(ref), progress=False)
    assert result.predicted_labels.tolist() == calls["knn_label"].tolist() and result.report["labels"]
    for extra, words in (([], "annotate with a reference"), (["--reference", ref, "--min-confidence", "0.5"], "min_confidence needs a head"),
                         (["--reference", ref, "--probabilities"], "drop --probabilities")):
        code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", model, *extra, "--output", tmp_path / "refused.csv")
        assert code == 1 and len(stderr.strip().splitlines()) == 1 and words in stderr, stderr
        assert not (tmp_path / "refused.csv").exists()
    with pytest.raises(SclError, match="embeddings only"):
        base.annotate(str(small_data / "val.h5ad"), progress=False)
    code, _, stderr = run("scl-serve", "--model", model, "--port", "1")
    assert code == 1 and "serve it with --reference" in stderr


def test_scimilarity_s_own_reference_imports_and_answers_as_hnswlib_does(base_dir, exported, small_data, tmp_path):
    import shutil

    import hnswlib

    model_dir = tmp_path / "scimilarity_model"
    shutil.copytree(base_dir, model_dir)
    model = tmp_path / "base.onnx"
    code, _, stderr = run("scl-export", model_dir, "--out", model, "--sample-cells", "16")
    assert code == 0, stderr
    annotator = Annotator(model)
    train = ad.read_h5ad(small_data / "train.h5ad")
    embedding = annotator.embed(train, progress=False)
    (model_dir / "annotation").mkdir()
    knn = hnswlib.Index(space="cosine", dim=embedding.shape[1])  # as SCimilarity's scripts/build_annotation_knn.py builds it
    knn.init_index(max_elements=len(embedding), ef_construction=1000, M=80)
    knn.set_ef(1000)
    knn.add_items(embedding, range(len(embedding)))
    knn.save_index(str(model_dir / "annotation" / "labelled_kNN.bin"))
    studies = np.where(np.arange(train.n_obs) < 100, "study_a", "study_b")
    (model_dir / "annotation" / "reference_labels.tsv").write_text("".join(f"{c}\t{s}\n" for c, s in zip(train.obs["cell_type"], studies)))
    out = tmp_path / "scimilarity.sclref"
    code, stdout, stderr = run("scl-reference", "import", model_dir, "--model", model, "--out", out)
    assert code == 0, stderr
    assert f"{train.n_obs:,} cells" in stdout and "M 80" in stdout
    reference = Reference.load(out)
    query = annotator.embed(str(small_data / "val.h5ad"), progress=False)
    own = hnswlib.Index(space="cosine", dim=embedding.shape[1])
    own.load_index(str(model_dir / "annotation" / "labelled_kNN.bin"))
    own.set_ef(100)  # SCimilarity's get_predictions_knn default
    expected_rows, expected_distances = own.knn_query(query, k=50)
    rows, distances = reference.search(query, 50)
    assert np.array_equal(rows, expected_rows.astype(np.int64))
    np.testing.assert_allclose(distances, expected_distances, atol=1e-6)
    hits = reference.hits(query[:2], k=3)
    assert hits["label"].tolist() == train.obs["cell_type"].astype(str).to_numpy()[rows[:2, :3].ravel()].tolist()
    assert hits["study"].tolist() == studies[rows[:2, :3].ravel()].tolist()
    code, _, stderr = run("scl-reference", "import", model_dir, "--model", exported, "--out", tmp_path / "x.sclref")
    assert code == 1 and "own encoder" in stderr and not (tmp_path / "x.sclref").exists()
    narrow = hnswlib.Index(space="cosine", dim=8)
    narrow.init_index(max_elements=len(embedding), M=16)
    narrow.add_items(embedding[:, :8], range(len(embedding)))
    narrow.save_index(str(model_dir / "annotation" / "labelled_kNN.bin"))
    code, _, stderr = run("scl-reference", "import", model_dir, "--model", model, "--out", tmp_path / "y.sclref")
    assert code == 1 and "8 dimensions" in stderr and len(stderr.strip().splitlines()) == 1


def test_restricting_to_two_labels_never_yields_a_third_from_the_head_or_the_neighbours(exported, small_data, reference_dir, tmp_path):
    out = tmp_path / "two.csv"
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--reference", reference_dir, "--restrict-to", "B,NK",
                          "--alpha", "0.1", "--output", out, "--quiet", "--probabilities", "--report", tmp_path / "two.json")
    assert code == 0, stderr
    calls = pd.read_csv(out, keep_default_na=False)
    for column in ("label", "second_label", "knn_label", "knn_second_label"):
        assert set(calls[column]) <= {"B", "NK", "unassigned", ""}, column
    assert {n for s in calls["prediction_set"] for n in s.split("|") if n} <= {"B", "NK"}
    probabilities = calls[[c for c in calls.columns if c.startswith("p_")]]
    np.testing.assert_allclose(probabilities[["p_B", "p_NK"]].sum(axis=1), 1, atol=1e-4)  # renormalised over the two
    assert json.loads((tmp_path / "two.json").read_text())["restriction"] == {"restrict_to": ["B", "NK"]}
    # the same through hnswlib's filter, in Python
    graph = Reference.build(str(small_data / "train.h5ad"), Annotator(exported), index="hnsw", progress=False)
    result = Annotator(exported).annotate(str(small_data / "val.h5ad"), reference=graph, exclude=["B"], progress=False)
    assert "B" not in set(result.calls["knn_label"]) | set(result.predicted_labels) | set(result.calls["knn_second_label"])
    cells = ad.read_h5ad(small_data / "val.h5ad")
    client = TestClient(create_app(Annotator(exported, session_threads=0), reference=Reference.load(reference_dir)))
    body = {"genes": list(cells.var_names), "values": cells.X[:20].toarray().tolist(), "restrict_to": ["Monocyte", "NK"]}
    served = client.post("/predict_batch", json=body).json()["cells"]
    assert {c["label"] for c in served} | {c["knn_label"] for c in served} <= {"Monocyte", "NK", "unassigned"}
    bad = client.post("/predict_batch", json=body | {"restrict_to": ["Monocyte", "T cell"]})
    assert bad.status_code == 422 and "'T cell' is not a label" in bad.json()["detail"]
    for args, words in ((["--restrict-to", "B,T cell"], "'T cell' is not a label of the model"), (["--restrict-to", "B", "--exclude", "NK"], "give one of them")):
        code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, *args, "--output", tmp_path / "bad.csv")
        assert code == 1 and len(stderr.strip().splitlines()) == 1 and words in stderr, stderr


@pytest.mark.parametrize("weighting", ["distance", "uniform"])
def test_the_vote_is_scimilarity_s_weighted_vote_computed_by_a_plain_loop(annotator, small_data, reference_dir, weighting):
    """knn_label, knn_share, knn_second_label and knn_min_dist against SCimilarity's get_predictions_knn (weighting=True:
    1/distance; False: one vote each), rewritten as its loop over each cell's neighbours."""
    from collections import defaultdict

    reference = Reference.load(reference_dir)
    query = annotator.embed(str(small_data / "val.h5ad"), progress=False)
    calls = reference.calls(query, 20, weighting=weighting)
    rows, distances = reference.search(query, 20)
    for i, (neighbours, dist) in enumerate(zip(rows, distances)):
        weight = defaultdict(float)
        for n, d in zip(neighbours, dist):
            weight[reference.labels[reference.cells.labels[n]]] += 1.0 / max(float(d), 1e-6) if weighting == "distance" else 1.0
        ranked = sorted(weight.items(), key=lambda item: -item[1])
        assert calls["knn_label"][i] == ranked[0][0]
        assert calls["knn_share"][i] == pytest.approx(ranked[0][1] / sum(weight.values()), rel=1e-4)
        assert calls["knn_second_label"][i] == (ranked[1][0] if len(ranked) > 1 else "")
        assert calls["knn_min_dist"][i] == pytest.approx(dist.min(), abs=1e-6)
    with pytest.raises(SclError, match="weighting 'votes': choose one of distance, uniform"):
        reference.calls(query, 20, weighting="votes")


def test_the_cells_held_out_for_novelty_do_not_depend_on_the_files_order(annotator, small_data, tmp_path):
    a_file, b_file, _, _ = halves(small_data, tmp_path)
    ab = Reference.build([a_file, b_file], annotator, progress=False)
    ba = Reference.build([b_file, a_file], annotator, progress=False)
    assert set(ab.cells.ids) == set(ba.cells.ids) and ab.card["holdout"]["cells"] > 0
    assert ab.card["holdout"]["distances_by_label"] == ba.card["holdout"]["distances_by_label"]
