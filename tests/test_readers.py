"""The expression readers: every h5ad layout users have, written by anndata, and CSV/TSV files."""

import gzip

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scl.runtime.errors import SclError
from scl.runtime.expression import ExpressionSource, ReadOptions
from scl.runtime.genes import ensembl_to_symbol
from scl.runtime.normalize import lognorm


def read_all(path, genes, **options):
    with ExpressionSource(str(path), genes, ReadOptions(batch_size=50, **options)) as src:
        blocks = list(src.blocks())
        info = src.describe()
    ids = np.concatenate([b[0] for b in blocks])
    return ids, np.vstack([b[1] for b in blocks]), info


def scimilarity_reference(adata, genes):
    """What SCimilarity's own tutorial code gives: align_dataset, then lognorm_counts."""
    from scimilarity.utils import align_dataset, lognorm_counts

    a = adata.copy()
    a.layers["counts"] = a.X.copy()
    a = lognorm_counts(align_dataset(a, genes, gene_overlap_threshold=1000))
    return np.asarray(a.X.todense() if sp.issparse(a.X) else a.X)


def lognormed(x):
    x = np.asarray(x.todense() if sp.issparse(x) else x, dtype=np.float32)
    return lognorm(x.copy())


LAYOUTS = {
    "csr_float32": lambda a: a,
    "csc": lambda a: ad.AnnData(sp.csc_matrix(a.X), obs=a.obs, var=a.var),
    "dense": lambda a: ad.AnnData(a.X.toarray(), obs=a.obs, var=a.var),
    "csr_float64": lambda a: ad.AnnData(a.X.astype(np.float64), obs=a.obs, var=a.var),
    "csr_int32": lambda a: ad.AnnData(a.X.astype(np.int32), obs=a.obs, var=a.var),
    "dense_int64": lambda a: ad.AnnData(a.X.toarray().astype(np.int64), obs=a.obs, var=a.var),
    "counts_in_layer": lambda a: ad.AnnData(lognormed(a.X), obs=a.obs, var=a.var, layers={"counts": a.X}),
    "counts_in_raw": lambda a: _with_raw(a),
}


def _with_raw(a):
    out = a.copy()
    out.raw = a
    out = out[:, : a.n_vars // 2].copy()  # X keeps half the genes, raw all of them, as after HVG selection
    out.X = lognormed(out.X)
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_matches_scimilarity_normalisation(layout, pbmc_small, scimilarity_genes, tmp_path):
    path = tmp_path / f"{layout}.h5ad"
    LAYOUTS[layout](pbmc_small).write_h5ad(path)
    ids, x, info = read_all(path, scimilarity_genes)
    expected = scimilarity_reference(pbmc_small, scimilarity_genes)
    assert list(ids) == list(pbmc_small.obs_names)
    assert info["input_kind"] == "counts"
    assert info["genes"]["matched"] == 8228  # as ../shared/data/README.md states for the PBMC genes
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    want_matrix = {"counts_in_layer": "layers/counts", "counts_in_raw": "raw/X"}.get(layout, "X")
    assert info["matrix"] == want_matrix


def test_matrix_option_picks_the_stored_matrix(pbmc_small, scimilarity_genes, tmp_path):
    path = tmp_path / "layer.h5ad"
    LAYOUTS["counts_in_layer"](pbmc_small).write_h5ad(path)
    _, x, info = read_all(path, scimilarity_genes, matrix="X")
    assert info["matrix"] == "X" and info["input_kind"] == "lognorm"
    assert "expm1 row sums" in info["input_kind_evidence"]
    with pytest.raises(SclError, match="no raw/X in the file; choose one of X, layers/counts"):
        read_all(path, scimilarity_genes, matrix="raw/X")


def test_lognormalised_input_is_recognised_and_not_normalised_twice(pbmc_small, scimilarity_genes, tmp_path):
    path = tmp_path / "lognorm.h5ad"
    logged = lognormed(pbmc_small.X)
    ad.AnnData(logged, obs=pbmc_small.obs, var=pbmc_small.var).write_h5ad(path)
    _, x, info = read_all(path, scimilarity_genes)
    assert info["input_kind"] == "lognorm"
    col = {g: i for i, g in enumerate(scimilarity_genes)}
    j_in = [i for i, g in enumerate(pbmc_small.var_names) if g in col]
    np.testing.assert_allclose(x[:, [col[pbmc_small.var_names[i]] for i in j_in]], logged[:, j_in], rtol=1e-6)


def test_other_non_integer_values_are_refused(pbmc_small, scimilarity_genes, tmp_path):
    path = tmp_path / "cpm.h5ad"
    ad.AnnData(np.log1p(pbmc_small.X.toarray() / pbmc_small.X.sum(1).A * 1e6), obs=pbmc_small.obs, var=pbmc_small.var).write_h5ad(path)
    with pytest.raises(SclError, match="neither integer counts nor log1p"):
        read_all(path, scimilarity_genes)
    _, _, info = read_all(path, scimilarity_genes, input_kind="lognorm")
    assert info["input_kind_evidence"] == "as stated by the caller"


def test_ensembl_ids_with_symbol_column_and_alone(pbmc_small, scimilarity_genes, tmp_path):
    by_symbol = {}
    for gene_id, symbol in ensembl_to_symbol().items():
        by_symbol.setdefault(symbol, gene_id)
    keep = [g for g in pbmc_small.var_names if g in by_symbol]
    a = pbmc_small[:, keep].copy()
    ids = [by_symbol[g] + ".5" for g in keep]  # versioned IDs, as some pipelines write
    expected = scimilarity_reference(a, scimilarity_genes)

    cellxgene = ad.AnnData(a.X, obs=a.obs, var=a.var.assign(feature_name=list(keep)).set_index(np.array(ids)))
    cellxgene.var["feature_name"] = cellxgene.var["feature_name"].astype("category")
    cellxgene.write_h5ad(tmp_path / "cxg.h5ad")
    _, x, info = read_all(tmp_path / "cxg.h5ad", scimilarity_genes)
    assert info["genes_from"].startswith("var['feature_name']")
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)

    ids_only = ad.AnnData(a.X, obs=a.obs, var=a.var.set_index(np.array(ids)))
    ids_only.write_h5ad(tmp_path / "ids.h5ad")
    _, x, info = read_all(tmp_path / "ids.h5ad", scimilarity_genes)
    assert f"{len(keep)} Ensembl IDs mapped" in info["genes_from"]
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)

    _, x, info = read_all(tmp_path / "cxg.h5ad", scimilarity_genes, gene_column="feature_name")
    assert info["genes_from"] == "var['feature_name']"
    with pytest.raises(SclError, match="var has no column 'symbols'; choose one of: feature_name"):
        read_all(tmp_path / "cxg.h5ad", scimilarity_genes, gene_column="symbols")


def test_duplicate_and_differently_cased_symbols(pbmc_small, scimilarity_genes, tmp_path):
    a = pbmc_small[:, :6000].copy()
    names = list(a.var_names)
    names[1] = names[0]  # two columns of one gene: counts are summed
    names[2] = names[2].lower()  # matched ignoring case
    a.var_names = names
    a.write_h5ad(tmp_path / "dups.h5ad")
    _, x, info = read_all(tmp_path / "dups.h5ad", scimilarity_genes)
    assert info["genes"]["duplicate_input_genes"] == 1
    assert info["genes"]["matched_ignoring_case"] >= 1
    col = scimilarity_genes.index(pbmc_small.var_names[0])
    counts = pbmc_small.X[:, :6000].toarray()
    model_genes = set(scimilarity_genes)
    totals = counts[:, [i for i, g in enumerate(pbmc_small.var_names[:6000]) if g in model_genes]].sum(1)
    np.testing.assert_allclose(x[:, col], np.log1p((counts[:, 0] + counts[:, 1]) / totals * 1e4), rtol=1e-5)


def test_csc_above_the_memory_limit_is_refused_with_advice(pbmc_small, scimilarity_genes, tmp_path):
    path = tmp_path / "csc.h5ad"
    LAYOUTS["csc"](pbmc_small).write_h5ad(path)
    with pytest.raises(SclError, match=r"stored by genes \(CSC\).*save it as CSR once.*see csc_memory_limit"):
        read_all(path, scimilarity_genes, csc_limit_bytes=1000)


def test_csv_cells_as_rows_gzipped_and_tsv_genes_as_rows(pbmc_small, scimilarity_genes, tmp_path):
    dense = pbmc_small.X.toarray()
    header = "," + ",".join(pbmc_small.var_names)
    lines = [f"{cid}," + ",".join(f"{v:g}" for v in row) for cid, row in zip(pbmc_small.obs_names, dense)]
    with gzip.open(tmp_path / "cells.csv.gz", "wt") as fh:
        fh.write("\n".join([header, *lines]) + "\n")
    tsv = ["gene\t" + "\t".join(pbmc_small.obs_names)]
    tsv += [f"{g}\t" + "\t".join(f"{v:g}" for v in col) for g, col in zip(pbmc_small.var_names, dense.T)]
    (tmp_path / "genes.tsv").write_text("\n".join(tsv) + "\n")

    expected = scimilarity_reference(pbmc_small, scimilarity_genes)
    for path, opts in ((tmp_path / "cells.csv.gz", {}), (tmp_path / "genes.tsv", {"genes_as_rows": True})):
        ids, x, info = read_all(path, scimilarity_genes, **opts)
        assert list(ids) == list(pbmc_small.obs_names)
        np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, expected_matched",
    [("pbmc_sorted_dev.h5ad", 8228), ("darmanis_brain_466.h5ad", 17101), ("celltypist_sample_559cells.csv.gz", 19531)],
)
def test_real_files_align_to_scimilaritys_gene_order(name, expected_matched, scimilarity_genes):
    from conftest import shared_file

    path = shared_file(name)
    ids, x, info = read_all(path, scimilarity_genes)
    assert info["genes"]["matched"] == expected_matched
    assert info["genes"]["model_genes_missing"] == 28231 - expected_matched
    assert x.shape == (len(ids), 28231) and len(set(ids)) == len(ids)
    nonzero = x.sum(1) > 0
    np.testing.assert_allclose(np.expm1(x[nonzero]).sum(1), 1e4, rtol=1e-3)


@pytest.mark.parametrize(
    "input_genes, model_genes",
    [(["x1", "g2", "g0", "x2", "g1"], ["g0", "g1", "g2", "g3", "g4"]), (["x1", "g2", "g0", "x2", "g1"], ["g0", "g1", "g2"]),
     (["x1", "g2", "g0", "g2", "g1"], ["g0", "g1", "g2", "g3"]), (["g1", "g2", "g0", "g2", "g1"], ["g0", "g1", "g2"]),
     (["x1", "g2", "g0", "g2", "g1"], ["g0", "g1", "g2"])],
    ids=["a_model_gene_is_missing", "every_model_gene_present", "duplicate_input_genes", "duplicates_and_every_gene_present",
         "duplicates_unused_genes_and_every_gene_present"],
)
def test_sparse_blocks_normalise_on_their_nonzeros_like_the_dense_path(input_genes, model_genes):
    """The fast sparse path (normalise the nonzeros, then scatter) against dense alignment then lognorm, with
    empty rows first, in the middle and last, input genes the model does not use (x1, x2) and duplicates."""
    from scl.runtime.genes import align_genes, aligned_dense
    from scl.runtime.h5ad import SparseRows

    dense = np.array([[0, 0, 0, 0, 0], [5, 1, 2, 7, 0], [0, 0, 0, 0, 0], [0, 3, 0, 0, 4], [9, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
    csr = sp.csr_matrix(dense)
    block = SparseRows(csr.data, csr.indices.astype(np.int32), csr.indptr.astype(np.int64))
    stored = block.data.copy()
    alignment = align_genes(input_genes, model_genes, min_overlap=1)
    expected = lognorm(aligned_dense(dense, alignment))
    buffer = np.full(len(dense) * len(model_genes), 7.0, np.float32)  # stale values must not survive
    got = aligned_dense(block, alignment, buffer, lognormalise=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert got[0].sum() == 0 and got[2].sum() == 0 and got[5].sum() == 0
    if "x1" in input_genes:
        assert got[4].sum() == 0  # row 4 has counts only in an unused gene
    np.testing.assert_array_equal(block.data, stored)  # the input block is not changed
    np.testing.assert_array_equal(aligned_dense(block, alignment), aligned_dense(dense, alignment))


def test_row_sums_with_empty_rows_first_between_and_last():
    from scl.runtime.genes import _row_sums

    values = np.array([1, 2, 3, 4, 5], np.float32)
    np.testing.assert_array_equal(_row_sums(values, np.array([0, 0, 2, 2, 5, 5, 5])), [0, 3, 0, 12, 0, 0])
    np.testing.assert_array_equal(_row_sums(values[:0], np.array([0, 0, 0])), [0, 0])


@pytest.mark.parametrize("layout", ["csr_float32", "dense", "zarr"])
def test_a_row_range_reads_those_cells_their_ids_and_obs_and_refuses_a_bad_range(layout, pbmc_small, scimilarity_genes, tmp_path):
    """What each dask task reads of a file: cells start..stop-1, with their own ids and obs values only."""
    a = LAYOUTS.get(layout, LAYOUTS["csr_float32"])(pbmc_small)
    a.obs["batch"] = pd.Categorical(np.where(np.arange(a.n_obs) % 3 == 0, "b1", "b2"))
    a.obs["dose"] = pd.array(np.where(np.arange(a.n_obs) % 5 == 0, None, np.arange(a.n_obs)), dtype="Int64")
    path = tmp_path / ("cells.zarr" if layout == "zarr" else "cells.h5ad")
    a.write_zarr(path) if layout == "zarr" else a.write_h5ad(path)
    ids, x, _ = read_all(path, scimilarity_genes)
    with ExpressionSource(str(path), scimilarity_genes, ReadOptions(batch_size=50, rows=(33, 101))) as src:
        blocks = list(src.blocks())
        batch, dose = src.matrix.obs_column("batch"), src.matrix.obs_column("dose")
    assert list(np.concatenate([b[0] for b in blocks])) == list(ids[33:101])
    np.testing.assert_array_equal(np.vstack([b[1] for b in blocks]), x[33:101])
    assert list(batch) == list(a.obs["batch"].iloc[33:101])
    assert [None if v is None else int(v) for v in dose] == [None if pd.isna(v) else int(v) for v in a.obs["dose"].iloc[33:101]]
    for bad in [(0, a.n_obs + 1), (50, 50), (-1, 10)]:
        with pytest.raises(SclError, match=f"rows {bad[0]}..{bad[1]} of {a.n_obs} cells cannot be read"):
            ExpressionSource(str(path), scimilarity_genes, ReadOptions(rows=bad))


def test_ids_whose_hashes_meet_are_compared_by_name(pbmc_small, scimilarity_genes, tmp_path, monkeypatch):
    """A file's ids are checked unique by 64-bit hashes, read a million at a time; where hashes meet (here all of them),
    the ids are compared by name, so unique ids pass and a real duplicate is named."""
    import scl.runtime.expression as expression
    import scl.runtime.h5ad as h5ad

    path = tmp_path / "cells.h5ad"
    pbmc_small.write_h5ad(path)
    monkeypatch.setattr(expression, "hash", lambda name: 7, raising=False)
    reads = []
    real = h5ad.read_index
    monkeypatch.setattr(h5ad, "read_index", lambda elem, rows=slice(None): reads.append(rows) or real(elem, rows))
    with ExpressionSource(str(path), scimilarity_genes, ReadOptions(batch_size=50)) as src:
        ids = np.concatenate([b[0] for b in src.blocks()])
    assert list(ids) == list(pbmc_small.obs_names) and src.n_cells == pbmc_small.n_obs
    assert max(r.stop - r.start for r in reads if r != slice(None)) == pbmc_small.n_obs  # the check's one chunk; blocks read 50
    assert sorted({r.stop - r.start for r in reads if r != slice(None)})[:2] == [pbmc_small.n_obs % 50 or 50, 50]
    twice = pbmc_small.copy()
    twice.obs_names = [*twice.obs_names[:-1], twice.obs_names[0]]
    twice.write_h5ad(tmp_path / "twice.h5ad")
    with pytest.raises(SclError, match=f"cell id {twice.obs_names[0]!r} occurs more than once \\(1 duplicated\\)"):
        ExpressionSource(str(tmp_path / "twice.h5ad"), scimilarity_genes)
