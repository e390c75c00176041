"""import scl: the same calls from Python as from scl-annotate and scl-serve, on real PBMC cells in every layout."""

import json
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from fastapi.testclient import TestClient

import scl
from scl.runtime.annotator import AnnotateOptions
from scl.runtime.serve import create_app

from conftest import run
from test_readers import LAYOUTS

REPO = Path(__file__).resolve().parents[1]
IN_MEMORY = ("csr_float32", "dense", "counts_in_layer", "counts_in_raw", "csc")


@pytest.fixture(scope="module")
def annotator(exported):
    return scl.Annotator(exported)


@pytest.fixture(scope="module")
def cli_calls(exported, pbmc_small, tmp_path_factory):
    """scl-annotate's calls and probabilities on the 119 PBMC cells, from the .h5ad file."""
    d = tmp_path_factory.mktemp("api")
    pbmc_small.write_h5ad(d / "cells.h5ad")
    code, _, stderr = run("scl-annotate", d / "cells.h5ad", "--model", exported, "--output", d / "out.h5ad", "--probabilities", "--quiet")
    assert code == 0, stderr
    return ad.read_h5ad(d / "out.h5ad")


def test_public_surface_imports_without_torch_and_fast():
    code = "import time, sys; t = time.perf_counter(); import scl; dt = time.perf_counter() - t\n" \
           "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, 'heavy import'\nprint(dt)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 3  # measured 0.4 s; pandas, anndata, torch and onnxruntime are not imported
    assert set(scl.__all__) >= {"Annotator", "annotate", "AnnotationResult", "SclError", "majority_vote", "__version__"}
    assert re.match(r"\d+\.\d+", scl.__version__) and issubclass(scl.SclError, ValueError)
    for name in scl.__all__:
        obj = getattr(scl, name)
        if callable(obj) and not isinstance(obj, type(scl.COLUMNS)):
            assert "Examples" in (obj.__doc__ or ""), f"{name} has no example in its docstring"


@pytest.mark.parametrize("layout", IN_MEMORY)
def test_anndata_in_memory_matches_scl_annotate(layout, exported, pbmc_small, cli_calls):
    adata = LAYOUTS[layout](pbmc_small)
    before = adata.copy()
    annotated = scl.annotate(adata, exported, copy=True, progress=False)
    assert adata.obs.columns.tolist() == before.obs.columns.tolist() and "X_scl" not in adata.obsm  # copy=True leaves it alone
    assert list(annotated.obs["scl_label"]) == list(cli_calls.obs["scl_label"])
    # float32 rounding of the two reading paths, magnified by the calibration temperature (logits / T, T < 1 here)
    np.testing.assert_allclose(annotated.obsm["scl_probabilities"], cli_calls.obsm["scl_probabilities"], atol=1e-5)
    np.testing.assert_allclose(annotated.obsm["X_scl"], cli_calls.obsm["X_scl"], atol=1e-6)
    # the same obs columns, in the same order, as the h5ad output
    assert [c for c in annotated.obs.columns if c.startswith("scl_")] == [c for c in cli_calls.obs.columns if c.startswith("scl_")]
    report = json.loads(annotated.uns["scl"]["report_json"])
    assert report["cells"] == 119 and report["input"]["input_kind"] == "counts"
    assert report["input"]["matrix"] == {"counts_in_layer": "layers['counts']", "counts_in_raw": "raw.X"}.get(layout, report["input"]["matrix"])


def test_backed_anndata_is_read_from_its_file(exported, pbmc_small, cli_calls, tmp_path):
    LAYOUTS["counts_in_layer"](pbmc_small).write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    scl.annotate(backed, exported, progress=False)
    assert list(backed.obs["scl_label"]) == list(cli_calls.obs["scl_label"])
    assert json.loads(backed.uns["scl"]["report_json"])["input"]["matrix"] == "layers/counts"
    backed.file.close()


def test_in_place_key_added_and_layer_choice(exported, pbmc_small, cli_calls):
    adata = LAYOUTS["counts_in_layer"](pbmc_small)
    assert scl.annotate(adata, exported, key_added="pbmc", progress=False) is None  # in place, scanpy-style
    assert list(adata.obs["pbmc_label"]) == list(cli_calls.obs["scl_label"]) and adata.obsm["X_pbmc"].shape == (119, 16)
    with pytest.raises(scl.SclError, match="no layer 'spliced'.*see layer"):
        scl.annotate(adata, exported, layer="spliced")
    with pytest.raises(scl.SclError, match="takes an AnnData"):
        scl.annotate(adata.X, exported)
    for bad, words in (({"batch_size": 0}, "batch_size 0.*see batch_size"), ({"min_confidence": float("nan")}, "min_confidence nan.*see min_confidence"),
                       ({"min_cell_genes": -1}, "min_cell_genes -1")):
        with pytest.raises(scl.SclError, match=words):
            scl.annotate(adata, exported, progress=False, **bad)


def test_matrices_and_dataframes_through_the_annotator(annotator, pbmc_small, cli_calls):
    genes = list(pbmc_small.var_names)
    csr = pbmc_small.X.tocsr()
    frame = pd.DataFrame(csr.toarray(), index=pbmc_small.obs_names, columns=genes)
    sparse_frame = pd.DataFrame.sparse.from_spmatrix(csr, index=pbmc_small.obs_names, columns=genes)
    expected = list(cli_calls.obs["scl_label"])
    for data, kwargs in ((csr, {"genes": genes}), (sp.csc_matrix(csr), {"genes": genes}), (csr.toarray(), {"genes": genes}),
                         (frame, {}), (sparse_frame, {})):
        result = annotator.annotate(data, progress=False, batch_size=50, **kwargs)  # 3 blocks, in flight at once
        assert list(result.predicted_labels) == expected, type(data)
        np.testing.assert_allclose(result.probabilities, cli_calls.obsm["scl_probabilities"], atol=1e-5)
    assert list(result.cell_ids) == list(pbmc_small.obs_names)
    table = result.to_frame(probabilities=True)
    assert list(table.columns[:len(annotator.columns())]) == [c.name for c in annotator.columns()] and table.index.name == "cell_id"
    assert f"p_{annotator.classes[0]}" in table.columns and len(table) == 119
    np.testing.assert_allclose(annotator.embed(csr, genes=genes, progress=False), cli_calls.obsm["X_scl"], atol=1e-6)
    standalone = result.to_adata()
    assert standalone.n_obs == 119 and list(standalone.obs["scl_label"]) == expected
    with pytest.raises(scl.SclError, match="pass genes="):
        annotator.annotate(csr)
    with pytest.raises(scl.SclError, match="columns but 3 gene names"):
        annotator.annotate(csr, genes=genes[:3])
    with pytest.raises(scl.GeneOverlapError, match="see gene_column, min_genes"):
        annotator.annotate(csr, genes=[f"g{i}" for i in range(len(genes))])


BIG_SPARSE = """
import resource, sys
import anndata as ad, numpy as np, scipy.sparse as sp
import scl
cells = ad.read_h5ad(sys.argv[2])
x = sp.vstack([cells.X.tocsr()] * 8).tocsr()          # 22,400 cells: 2.5 GB if made dense over 28,231 genes
annotator = scl.Annotator(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result = annotator.annotate(x, genes=list(cells.var_names), progress=False)
print(len(result.cell_ids), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)
"""


def test_a_big_sparse_matrix_is_never_made_dense(exported, pbmc_path):
    """Blocks of CSR rows are views into the caller's matrix: peak memory grows by a few blocks, not the dense matrix."""
    out = subprocess.run([sys.executable, "-c", BIG_SPARSE, str(exported), str(pbmc_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    cells, grown_mb = out.stdout.split()
    assert int(cells) == 22_400
    assert float(grown_mb) < 400, f"peak RSS grew {grown_mb} MB"  # dense: 2,529 MB; a block buffer per core: 29 MB each


def test_server_answers_equal_the_api(exported, annotator, pbmc_small):
    result = annotator.annotate(pbmc_small, alpha=0.1, progress=False)
    client = TestClient(create_app(scl.Annotator(exported, session_threads=0)))
    cells = []
    for i in range(5):
        row = pbmc_small.X[i].toarray()[0]
        cells.append({g: float(v) for g, v in zip(pbmc_small.var_names, row) if v})
    answers = client.post("/predict_batch", json={"cells": cells, "top_k": 7, "alpha": 0.1}).json()["cells"]
    frame = result.to_frame()
    columns = annotator.columns(AnnotateOptions(alpha=0.1))
    assert {"novelty_p", "prediction_set", "set_size"} <= {c.name for c in columns}
    for i, answer in enumerate(answers):
        for column in columns:
            expected = frame[column.name].iloc[i]
            if column.kind == "float":
                assert answer[column.name] == pytest.approx(float(expected), abs=1e-6)
            elif column.kind == "set":
                assert answer[column.name] == [name for name in expected.split("|") if name] and len(answer[column.name]) == answer["set_size"]
            else:
                assert answer[column.name] == {"bool": bool, "int": int}.get(column.kind, str)(expected)
        probs = {t["label"]: t["probability"] for t in answer["top"]}
        np.testing.assert_allclose([probs[c] for c in annotator.classes], result.probabilities[i], atol=1e-6)


def test_majority_voting_from_python_and_the_command_line(exported, annotator, pbmc_small, tmp_path):
    adata = pbmc_small.copy()
    adata.obs["leiden"] = pd.Categorical(adata.obs["cell_type"].astype(str))  # clusters that are the sorted populations
    result = annotator.annotate(adata, over_clustering="leiden", progress=False)
    votes = result.to_frame()
    for cluster, group in votes.groupby("cluster", observed=True):
        top = group["label"].value_counts()
        assert (group["majority_label"] == top.index[0]).all() or (group["majority_label"] == "heterogeneous").all()
        assert group["majority_share"].iloc[0] == pytest.approx(top.iloc[0] / len(group))
    assert result.report["majority_voting"]["clusters"] == 7
    strict = annotator.annotate(adata, over_clustering="leiden", min_share=1.0, progress=False).to_frame()
    mixed = votes.groupby("cluster", observed=True)["majority_share"].first() < 1
    assert (strict["majority_label"] == "heterogeneous").sum() == votes["cluster"].isin(mixed[mixed].index).sum()
    auto = annotator.annotate(adata, majority_voting=True, progress=False)
    assert auto.report["majority_voting"]["clusters"] == 11  # ceil(sqrt(119))
    assert len(set(auto.calls["cluster"])) == 11

    adata.write_h5ad(tmp_path / "c.h5ad")
    for output, flags in (("v.h5ad", ["--over-clustering", "leiden"]), ("v.csv", ["--over-clustering", "leiden"]), ("a.csv", ["--majority-voting"])):
        code, stdout, stderr = run("scl-annotate", tmp_path / "c.h5ad", "--model", exported, "--output", tmp_path / output, *flags)
        assert code == 0, stderr
        assert "majority voting over" in stdout
    written = ad.read_h5ad(tmp_path / "v.h5ad")
    assert list(written.obs["scl_majority_label"]) == list(votes["majority_label"])
    np.testing.assert_allclose(written.obs["scl_majority_share"], votes["majority_share"], atol=1e-6)
    table = pd.read_csv(tmp_path / "v.csv")
    assert list(table["majority_label"]) == list(votes["majority_label"]) and list(table["label"]) == list(votes["label"])
    assert list(pd.read_csv(tmp_path / "a.csv")["majority_label"]) == list(auto.to_frame()["majority_label"])
    code, _, stderr = run("scl-annotate", tmp_path / "c.h5ad", "--model", exported, "--output", tmp_path / "x.csv", "--over-clustering", "louvain")
    assert code == 1 and "obs has no column 'louvain'" in stderr and "(see --over-clustering)" in stderr


def readme_python_example() -> str:
    """The README's notebook examples, from "From Python" to "Where the numbers are", as one script."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## From Python"):text.index("## Where the numbers are")]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))


def test_the_readme_python_examples_run_as_written(exported, small_data, tmp_path):
    """Run as `python -c`, as a notebook runs them: dask's worker processes re-import a script's file, not a notebook."""
    (tmp_path / "demo_out" / "data").mkdir(parents=True)
    (tmp_path / "demo_out" / "model.onnx").symlink_to(exported)
    (tmp_path / "demo_out" / "data" / "pbmc_heldout.h5ad").symlink_to(small_data / "val.h5ad")
    (tmp_path / "demo_out" / "data" / "pbmc_train.h5ad").symlink_to(small_data / "train.h5ad")
    out = subprocess.run([sys.executable, "-c", readme_python_example()], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scl_label" in out.stdout and "knn_label" in out.stdout and "scl_knn_agrees" in out.stdout
    assert (tmp_path / "pbmc.sclref" / "reference.json").is_file()
