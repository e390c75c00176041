"""Bad input: one clear line naming the problem and the fix, never a traceback."""

import shutil

import anndata as ad
import numpy as np
import pytest

from scl.runtime.errors import SclError
from scl.runtime.expression import ExpressionSource, ReadOptions
from scl.runtime.h5ad import H5adFile


def read_all(path, genes, **options):
    with ExpressionSource(str(path), genes, ReadOptions(**options)) as src:
        for _ in src.blocks():
            pass


def write(adata, path):
    adata.write_h5ad(path)
    return path


def assert_one_line(err: pytest.ExceptionInfo, *words):
    message = str(err.value)
    assert "\n" not in message
    assert " --" not in message, message  # library messages name settings; only the CLI spells them as flags
    for word in words:
        assert word in message, message


def test_empty_file(tmp_path, scimilarity_genes):
    (tmp_path / "empty.h5ad").write_bytes(b"")
    with pytest.raises(SclError) as err:
        read_all(tmp_path / "empty.h5ad", scimilarity_genes)
    assert_one_line(err, "empty", "write_h5ad")


def test_not_hdf5(tmp_path, scimilarity_genes):
    (tmp_path / "x.h5ad").write_text("cell,CD3E\nc1,4\n")
    with pytest.raises(SclError) as err:
        read_all(tmp_path / "x.h5ad", scimilarity_genes)
    assert_one_line(err, "not an HDF5 file", ".csv")


def test_truncated_file(tmp_path, pbmc_path, scimilarity_genes):
    data = pbmc_path.read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    with pytest.raises(SclError) as err:
        read_all(tmp_path / "cut.h5ad", scimilarity_genes)
    assert_one_line(err, "truncated")


def test_missing_file(tmp_path, scimilarity_genes):
    with pytest.raises(SclError) as err:
        read_all(tmp_path / "nope.h5ad", scimilarity_genes)
    assert_one_line(err, "no such file")


@pytest.mark.parametrize("bad, words", [(-1.0, ("negative", "raw counts")), (np.nan, ("NaN",)), (np.inf, ("infinite",))])
def test_bad_values(bad, words, pbmc_small, scimilarity_genes, tmp_path):
    x = pbmc_small.X.copy()
    x.data[5] = bad
    path = write(ad.AnnData(x, obs=pbmc_small.obs, var=pbmc_small.var), tmp_path / "bad.h5ad")
    with pytest.raises(SclError) as err:
        read_all(path, scimilarity_genes)
    assert_one_line(err, *words)


def test_no_overlapping_genes(pbmc_small, scimilarity_genes, tmp_path):
    a = pbmc_small.copy()
    a.var_names = [f"gene{i}" for i in range(a.n_vars)]
    with pytest.raises(SclError) as err:
        read_all(write(a, tmp_path / "g.h5ad"), scimilarity_genes)
    assert_one_line(err, "only 0 of the model's 28231 genes", "at least 5000", "see gene_column, min_genes")


def test_too_few_overlapping_genes_scales_with_the_model(pbmc_small, scimilarity_genes, tmp_path):
    path = write(pbmc_small[:, :3000].copy(), tmp_path / "few.h5ad")
    with pytest.raises(SclError, match=r"only 2\d\d\d of the model's 28231 genes"):
        read_all(path, scimilarity_genes)
    read_all(path, scimilarity_genes, min_genes=1000)  # the threshold is an option
    in_pbmc = set(pbmc_small.var_names)
    pbmc_model = [g for g in scimilarity_genes if g in in_pbmc]
    read_all(path, pbmc_model)  # the threshold scales: 8,228 model genes need 1,458


def test_duplicate_cell_ids_h5ad_and_csv(pbmc_small, scimilarity_genes, tmp_path):
    a = pbmc_small.copy()
    a.obs_names = ["same"] * 2 + list(a.obs_names[2:])
    with pytest.raises(SclError) as err:
        read_all(write(a, tmp_path / "d.h5ad"), scimilarity_genes)
    assert_one_line(err, "'same' occurs more than once", "obs_names_make_unique")
    header = "," + ",".join(pbmc_small.var_names)
    rows = [f"c{i % 3}," + ",".join("1" for _ in range(pbmc_small.n_vars)) for i in range(5)]
    (tmp_path / "d.csv").write_text("\n".join([header, *rows]) + "\n")
    with pytest.raises(SclError, match="'c0' occurs more than once"):
        read_all(tmp_path / "d.csv", scimilarity_genes)


def test_ragged_and_truncated_csv(pbmc_small, scimilarity_genes, tmp_path):
    header = "," + ",".join(pbmc_small.var_names[:6000])
    (tmp_path / "r.csv").write_text(header + "\nc1," + ",".join(["1"] * 5999) + "\nc2,1,2\n")
    with pytest.raises(SclError, match="do not parse as numbers"):
        read_all(tmp_path / "r.csv", scimilarity_genes)
    import gzip

    blob = gzip.compress((header + "\n" + "\n".join("c%d," % i + ",".join(["1"] * 6000) for i in range(50))).encode())
    (tmp_path / "t.csv.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SclError, match="truncated or corrupt"):
        read_all(tmp_path / "t.csv.gz", scimilarity_genes)


def test_missing_label_column(pbmc_path):
    f = H5adFile(str(pbmc_path))
    with pytest.raises(SclError) as err:
        f.obs_column("celltype")
    assert_one_line(err, "obs has no column 'celltype'", "cell_type")
    f.close()


@pytest.mark.parametrize("corrupt, words", [
    (lambda f: f["X/indices"].__setitem__(5, 10**6), "gene index 1000000"),
    (lambda f: f["X/indptr"].__setitem__(3, 1), "indptr decreases"),
    (lambda f: f["X/indptr"].__setitem__(-1, f["X/indptr"][-1] + 50), "indptr ends at"),
])
def test_corrupt_csr_is_refused_in_one_line(corrupt, words, pbmc_small, scimilarity_genes, tmp_path):
    import h5py

    path = write(pbmc_small, tmp_path / "c.h5ad")
    with h5py.File(path, "r+") as f:
        corrupt(f)
    with pytest.raises(SclError) as err:
        read_all(path, scimilarity_genes)
    assert_one_line(err, "the sparse matrix is corrupt", words, "write it again")


def test_every_block_is_checked_against_the_kind_judged_on_the_first(pbmc_small, scimilarity_genes, tmp_path):
    """Blocks of 32: the first 64 cells log-normalised, the rest raw counts (or one non-integer cell late in a counts file)."""
    import scipy.sparse as sp

    counts = pbmc_small.X.tocsr().astype(np.float32)
    totals = np.asarray(counts.sum(1)).ravel()
    logged = sp.csr_matrix(np.log1p(counts.multiply(1e4 / totals[:, None]).toarray()))
    mixed = ad.AnnData(sp.vstack([logged[:64], counts[64:]]).tocsr(), obs=pbmc_small.obs, var=pbmc_small.var)
    with pytest.raises(SclError) as err:
        read_all(write(mixed, tmp_path / "mixed.h5ad"), scimilarity_genes, batch_size=32)
    assert_one_line(err, f"cell {pbmc_small.obs_names[64]!r} is not log1p(counts per 1e4)", "mixes kinds", "see input_kind")
    late = counts.copy()
    late.data[late.indptr[100]] = 2.5  # cell 100, in the fourth block
    with pytest.raises(SclError) as err:
        read_all(write(ad.AnnData(late, obs=pbmc_small.obs, var=pbmc_small.var), tmp_path / "late.h5ad"), scimilarity_genes, batch_size=32)
    assert_one_line(err, f"cell {pbmc_small.obs_names[100]!r} holds non-integer values (2.5)", "first cells are raw counts")
    read_all(tmp_path / "late.h5ad", scimilarity_genes, batch_size=32, input_kind="counts")  # stated by the user: taken as given
