"""Inputs in the other layouts users hold: 10x Genomics .h5 (v3 and v2), MTX folders and anndata zarr stores give
the labels their .h5ad gives; loom files and other folders are named with their conversion; CSV/TSV quirks are read."""

import gzip

import anndata as ad

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import io, sparse

import scl
from scl.runtime.errors import SclError

from conftest import run


@pytest.fixture(scope="module")
def annotator(exported):
    return scl.Annotator(exported)


@pytest.fixture(scope="module")
def reference(annotator, pbmc_small):
    return annotator.annotate(pbmc_small, progress=False)


def antibody_counts(pbmc_small) -> sparse.csr_matrix:
    """A CITE-seq-like antibody panel named like genes (CD4, CD19) with large counts: must never be read as genes."""
    return sparse.csr_matrix(np.full((pbmc_small.n_obs, 2), 5000, dtype=np.float32))


def write_tenx_h5(path, pbmc_small, version: int = 3) -> None:
    genes = list(pbmc_small.var_names)
    x = sparse.hstack([pbmc_small.X, antibody_counts(pbmc_small)]).tocsr().astype(np.int32)  # cells x features = CSC of features x cells
    with h5py.File(path, "w") as f:
        group = f.create_group("matrix" if version == 3 else "GRCh38")
        group["barcodes"] = np.array(pbmc_small.obs_names, dtype="S")
        group["data"], group["indices"], group["indptr"] = x.data, x.indices.astype(np.int64), x.indptr.astype(np.int64)
        group["shape"] = np.array([x.shape[1], x.shape[0]], dtype=np.int32)
        ids = [f"ENSG{i:011d}" for i in range(len(genes))] + ["CD4_TotalSeqB", "CD19_TotalSeqB"]
        if version == 3:
            features = group.create_group("features")
            features["name"] = np.array(genes + ["CD4", "CD19"], dtype="S")
            features["id"] = np.array(ids, dtype="S")
            features["feature_type"] = np.array(["Gene Expression"] * len(genes) + ["Antibody Capture"] * 2, dtype="S")
        else:
            group["gene_names"] = np.array(genes + ["CD4_TotalSeqB", "CD19_TotalSeqB"], dtype="S")
            group["genes"] = np.array(ids, dtype="S")


def write_mtx_folder(folder, pbmc_small, gzipped: bool) -> None:
    folder.mkdir()
    x = sparse.hstack([pbmc_small.X, antibody_counts(pbmc_small)]).tocsc()
    genes = list(pbmc_small.var_names)
    features = [f"ENSG{i:011d}\t{g}\tGene Expression" for i, g in enumerate(genes)] + ["CD4_ab\tCD4\tAntibody Capture", "CD19_ab\tCD19\tAntibody Capture"]
    io.mmwrite(str(folder / "matrix.mtx"), x.T.astype(np.int64))
    files = {"features.tsv": "\n".join(features) + "\n", "barcodes.tsv": "\n".join(pbmc_small.obs_names) + "\n"}
    for name, text in files.items():
        if gzipped:
            with gzip.open(folder / (name + ".gz"), "wt") as fh:
                fh.write(text)
        else:
            (folder / name).write_text(text)
    if gzipped:
        with open(folder / "matrix.mtx", "rb") as src, gzip.open(folder / "matrix.mtx.gz", "wb") as dst:
            dst.write(src.read())
        (folder / "matrix.mtx").unlink()


@pytest.mark.parametrize("version", [3, 2])
def test_a_10x_h5_gives_the_labels_of_its_h5ad(annotator, reference, pbmc_small, tmp_path, version):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    write_tenx_h5(path, pbmc_small, version)
    result = annotator.annotate(str(path), progress=False)
    assert list(result.cell_ids) == list(pbmc_small.obs_names)
    assert (result.predicted_labels == reference.predicted_labels).all()
    assert (result.calls["genes_detected"] == reference.calls["genes_detected"]).all()  # the antibodies matched no gene
    assert result.report["input"]["matrix"] == "10x feature-barcode matrix"
    code, _, stderr = run("scl-annotate", path, "--model", annotator.session.path, "--output", tmp_path / "calls.h5ad")
    assert code == 0, stderr
    written = ad.read_h5ad(tmp_path / "calls.h5ad")  # a new file holding the results, readable by anndata
    assert list(written.obs_names) == list(pbmc_small.obs_names)
    assert (written.obs["scl_label"].astype(str).to_numpy() == result.predicted_labels).all()


@pytest.mark.parametrize("gzipped", [True, False])
def test_a_10x_mtx_folder_gives_the_labels_of_its_h5ad(annotator, reference, pbmc_small, tmp_path, gzipped):
    folder = tmp_path / "filtered_feature_bc_matrix"
    write_mtx_folder(folder, pbmc_small, gzipped)
    for path in (folder, folder / ("matrix.mtx.gz" if gzipped else "matrix.mtx")):
        result = annotator.annotate(str(path), progress=False)
        assert list(result.cell_ids) == list(pbmc_small.obs_names)
        assert (result.predicted_labels == reference.predicted_labels).all()
        assert (result.calls["genes_detected"] == reference.calls["genes_detected"]).all()
    code, stdout, stderr = run("scl-annotate", folder, "--model", annotator.session.path, "--output", tmp_path / "calls.csv")
    assert code == 0, stderr
    (folder / ("barcodes.tsv.gz" if gzipped else "barcodes.tsv")).unlink()
    with pytest.raises(SclError, match="needs barcodes.tsv"):
        annotator.annotate(str(folder), progress=False)


@pytest.mark.parametrize("layout", ["csr", "dense", "counts layer"])
def test_an_anndata_zarr_store_gives_the_labels_of_its_h5ad(annotator, reference, pbmc_small, tmp_path, layout):
    cells = pbmc_small.copy()
    if layout == "dense":
        cells.X = cells.X.toarray()
    if layout == "counts layer":
        cells.layers["counts"], cells.X = cells.X.copy(), sparse.csr_matrix(cells.X.shape, dtype=np.float32)
    cells.obs["cluster"] = pd.Categorical(np.arange(cells.n_obs) % 3)
    cells.write_zarr(tmp_path / "cells.zarr")
    result = annotator.annotate(str(tmp_path / "cells.zarr"), progress=False)
    assert list(result.cell_ids) == list(pbmc_small.obs_names)
    assert (result.predicted_labels == reference.predicted_labels).all()
    assert result.report["input"]["matrix"] == ("layers/counts" if layout == "counts layer" else "X")
    code, _, stderr = run("scl-annotate", tmp_path / "cells.zarr", "--model", annotator.session.path, "--over-clustering", "cluster")
    assert code == 0 and (tmp_path / "cells.scl.csv").is_file(), stderr


def test_loom_and_other_folders_are_named_with_their_conversion(annotator, pbmc_small, tmp_path):
    (tmp_path / "not_a_store.zarr").mkdir()
    with h5py.File(tmp_path / "cells.loom", "w") as f:
        f["matrix"] = np.zeros((3, 2), np.float32)
        f.create_group("row_attrs")["Gene"] = np.array([b"CD3E", b"CD4", b"MS4A1"])
        f.create_group("col_attrs")["CellID"] = np.array([b"a", b"b"])
    (tmp_path / "empty_folder").mkdir()
    cases = {"not_a_store.zarr": "a folder without matrix.mtx", "cells.loom": "a loom file", "empty_folder": "a folder without matrix.mtx"}
    for name, words in cases.items():
        code, _, stderr = run("scl-annotate", tmp_path / name, "--model", annotator.session.path, "--output", tmp_path / "o.csv")
        assert code == 1 and words in stderr and "convert" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    (tmp_path / "notes.bin").write_bytes(b"\x00not hdf5")
    code, _, stderr = run("scl-annotate", tmp_path / "notes.bin", "--model", annotator.session.path, "--output", tmp_path / "o.csv")
    assert code == 1 and "10x .h5" in stderr and "MTX" in stderr, stderr


@pytest.mark.parametrize("quirk", ["trailing separator", "quoted numbers", "semicolons", "tabs in a .csv", "CRLF"])
def test_csv_quirks_are_read(annotator, pbmc_small, tmp_path, quirk):
    cells = pbmc_small[:20]
    x = cells.X.toarray().astype(int)
    sep = {"semicolons": ";", "tabs in a .csv": "\t"}.get(quirk, ",")
    end = "\r\n" if quirk == "CRLF" else "\n"

    def field(v):
        return f'"{v}"' if quirk == "quoted numbers" else str(v)

    tail = sep if quirk == "trailing separator" else ""
    lines = [sep.join(["cell", *cells.var_names]) + tail]
    lines += [sep.join([name, *map(field, row)]) + tail for name, row in zip(cells.obs_names, x)]
    path = tmp_path / "cells.csv"
    path.write_text(end.join(lines) + end)
    result = annotator.annotate(str(path), progress=False)
    expected = annotator.annotate(cells, progress=False)
    assert list(result.cell_ids) == list(cells.obs_names)
    assert (result.predicted_labels == expected.predicted_labels).all()


def test_geo_prefixed_mtx_files_and_default_output_names(annotator, reference, pbmc_small, tmp_path):
    folder = tmp_path / "filtered_feature_bc_matrix"
    write_mtx_folder(folder, pbmc_small, gzipped=True)
    code, _, stderr = run("scl-annotate", folder, "--model", annotator.session.path)
    assert code == 0 and (tmp_path / "filtered_feature_bc_matrix.scl.csv").is_file(), stderr  # beside the folder, not in it
    geo = tmp_path / "GSE1"
    geo.mkdir()
    for f in folder.iterdir():
        f.rename(geo / f"GSM7_{f.name}")
    result = annotator.annotate(str(geo / "GSM7_matrix.mtx.gz"), progress=False)
    assert (result.predicted_labels == reference.predicted_labels).all()
    code, _, stderr = run("scl-annotate", geo / "GSM7_matrix.mtx.gz", "--model", annotator.session.path)
    assert code == 0 and (geo / "GSM7.scl.csv").is_file(), stderr
    (geo / "GSM7_features.tsv.gz").unlink()
    code, _, stderr = run("scl-annotate", geo / "GSM7_matrix.mtx.gz", "--model", annotator.session.path)
    assert code == 1 and "GSM7_features.tsv or GSM7_genes.tsv" in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_a_damaged_mtx_folder_is_named_in_one_line(annotator, pbmc_small, tmp_path):
    folder = tmp_path / "mtx"
    write_mtx_folder(folder, pbmc_small, gzipped=True)
    whole = (folder / "matrix.mtx.gz").read_bytes()
    (folder / "matrix.mtx.gz").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    code, _, stderr = run("scl-annotate", folder, "--model", annotator.session.path, "--output", tmp_path / "o.csv")
    assert code == 1 and "not a readable Matrix Market file" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    (folder / "matrix.mtx.gz").write_bytes(whole)
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(pbmc_small.obs_names[:-1]) + "\n")  # one barcode short
    with pytest.raises(SclError, match="the files do not belong together"):
        annotator.annotate(str(folder), progress=False)
    assert not (tmp_path / "o.csv").exists()
