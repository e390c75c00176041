"""Training with its cells left in their files (--stream): the same cells in the same roles with the same values as in
memory, a model as good, bad cells refused before training, and a base with the same held-out cells."""

import json

import anndata as ad
import numpy as np
import pytest
import torch

from conftest import run, shared_file

# The batch orders differ (blocks of 64 cells shuffled within windows of 4,096, against a shuffle of single cells), so
# the runs differ a little. Measured on this test's runs: the shipped head 0.9506 both ways; the head LoRA trained on
# the embedding alone 0.9238 in memory, 0.9323 streamed.
F1_TOLERANCE = 0.03


def test_streamed_cells_are_the_cells_in_memory_in_the_same_roles(base_dir):
    """training_cells with stream=True: every role holds the same cells (ids, labels, file rows), and reading them
    gives the in-memory values bit for bit, for any rows in any order."""
    from scl.train.config import FinetuneConfig
    from scl.train.file_rows import FileRows
    from scl.train.model_dir import load_model_dir
    from scl.train.roles import training_cells

    base = load_model_dir(base_dir)
    config = dict(base_model=str(base_dir), data=str(shared_file("pbmc_sorted_dev.h5ad")))
    in_memory, streamed = (training_cells(FinetuneConfig(**config, stream=s), base) for s in (False, True))
    assert in_memory.classes == streamed.classes and len(in_memory.classes) == 7
    rng = np.random.default_rng(0)
    for role in ("train", "validation", "calibration"):
        a, b = getattr(in_memory, role), getattr(streamed, role)
        assert isinstance(b.x, FileRows) and b.x.shape == a.x.shape
        assert (a.cell_ids == b.cell_ids).all() and (a.labels == b.labels).all() and (a.rows == b.rows).all()
        index = rng.permutation(len(a))[:300]
        assert np.array_equal(a.x[index].toarray(), b.x[index].toarray())
    assert np.array_equal(in_memory.fit_rows, streamed.fit_rows)


@pytest.mark.parametrize("layout", ["dense", "csc"])
def test_streamed_cells_read_from_dense_and_csc_files_as_in_memory(layout, small_data, scimilarity_genes, tmp_path):
    import scipy.sparse as sp

    from scl.train.data import load_labelled

    cells = ad.read_h5ad(small_data / "brain.h5ad")
    cells.X = cells.X.toarray() if layout == "dense" else sp.csc_matrix(cells.X)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    in_memory, streamed = (load_labelled(str(tmp_path / "cells.h5ad"), scimilarity_genes, "cell_type", stream=s) for s in (False, True))
    index = np.random.default_rng(0).permutation(len(in_memory))
    assert np.array_equal(in_memory.x[index].toarray(), streamed.x[index].toarray())


def test_batch_orders_cover_every_cell_once_a_pass_and_reads_give_each_process_its_share():
    import scipy.sparse as sp

    from scl.train.data import BatchOrder, read_batches

    n = 1000
    for block in (1, 64):
        order = BatchOrder(n, 64, torch.Generator().manual_seed(0), block)
        one_pass = np.concatenate(list(order.take(n // 64)))
        assert len(np.unique(one_pass)) == len(one_pass) == n - n % 64  # a shuffle; the last partial batch dropped
    x = sp.random(n, 50, density=0.2, format="csr", random_state=0, dtype=np.float32)
    order = BatchOrder(n, 64, torch.Generator().manual_seed(0), 64)
    second_half = lambda batch: batch[1::2]  # noqa: E731 (rank 1 of 2)
    for index, dense in read_batches(x, order, 20, second_half, torch.device("cpu")):
        assert len(index) == 32 and np.array_equal(dense.numpy(), x[index].toarray())


@pytest.fixture(scope="module")
def memory_and_streamed(base_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    args = ("--base-model", base_dir, "--data", shared_file("pbmc_sorted_dev.h5ad"), "--epochs", "3", "--quiet")
    for name, extra in (("memory", ()), ("streamed", ("--stream",))):
        code, _, stderr = run("scl-train", *args, *extra, "--out", d / name)
        assert code == 0, stderr
    return [json.loads((d / name / "metrics.json").read_text()) for name in ("memory", "streamed")]


def test_a_streamed_run_trains_as_well_as_one_in_memory(memory_and_streamed):
    memory, streamed = memory_and_streamed
    assert memory["classes"] == streamed["classes"] and memory["cells"] == streamed["cells"]
    assert memory["validation"] == streamed["validation"] and memory["calibration"]["cells_per_class"] == streamed["calibration"]["cells_per_class"]
    assert streamed["config"]["stream"] and not memory["config"]["stream"]
    for method in ("base+linear", "base+knn"):  # the same frozen base on the same cells: the same baselines
        assert memory["methods"][method]["macro_f1"] == streamed["methods"][method]["macro_f1"]
    for method in ("lora", "lora-embedding"):  # the shipped head, and LoRA's own head on the embedding alone
        f1 = [m["methods"][method]["macro_f1"] for m in (memory, streamed)]
        assert abs(f1[0] - f1[1]) <= F1_TOLERANCE, (method, f1)
        assert min(f1) > memory["methods"]["base+linear"]["macro_f1"] + 0.1


def test_a_bad_cell_deep_in_a_streamed_file_is_refused_before_training(base_dir, tmp_path):
    """Past the first block (which every reader checks on opening): found by the pass that keys the cells."""
    import scipy.sparse as sp

    cells = ad.read_h5ad(shared_file("pbmc_sorted_dev.h5ad"))
    x = sp.csr_matrix(cells.X)
    x.data[x.indptr[2000]] = np.nan
    cells.X = x
    cells.write_h5ad(tmp_path / "nan.h5ad")
    code, _, stderr = run("scl-train", "--base-model", base_dir, "--data", tmp_path / "nan.h5ad", "--stream", "--epochs", "1", "--quiet",
                          "--out", tmp_path / "run")
    assert code == 1 and f"cell {cells.obs_names[2000]!r} holds NaN" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("*.scl-tmp-*"))


def test_epoch_cells_sets_how_many_cells_an_epoch_trains_on(base_dir, small_data, tmp_path):
    code, _, stderr = run("scl-train", "--base-model", base_dir, "--data", small_data / "train.h5ad", "--stream", "--epochs", "2",
                          "--patience", "2", "--epoch-cells", "64", "--batch-size", "32", "--quiet", "--out", tmp_path / "run")
    assert code == 0, stderr
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [row["cells_a_process"] for row in history] == [64, 64]


def test_a_streamed_pretrain_holds_out_the_same_cells(base_dir, small_data, scimilarity_genes, tmp_path):
    """The base_dir fixture's command with --stream: the same cells held out, and a base that trained."""
    code, _, stderr = run("scl-pretrain", "--data", small_data / "train.h5ad", "--data", small_data / "brain.h5ad",
                          "--gene-order", shared_file("scimilarity_gene_order.tsv"), "--out", tmp_path / "base",
                          "--hidden", "64,32", "--latent", "16", "--epochs", "2", "--batch-size", "64", "--stream")
    assert code == 0, stderr
    streamed, memory = (json.loads((d / "pretrain.json").read_text()) for d in (tmp_path / "base", base_dir))
    assert streamed["held_out"] == memory["held_out"] and streamed["config"]["stream"]
    assert all(np.isfinite(row["loss"]) for row in streamed["history"])


def test_a_file_rewritten_during_a_streamed_run_is_refused_and_nothing_is_written(base_dir, small_data, tmp_path, monkeypatch):
    import os
    import shutil

    from scl.runtime.errors import SclError
    from scl.train import finetune as finetune_module
    from scl.train.config import FinetuneConfig

    data = tmp_path / "train.h5ad"
    shutil.copy(small_data / "train.h5ad", data)
    trained = finetune_module.train_lora

    def train_then_rewrite(*args, **kwargs):  # another program writes the file while scl-train reads it
        result = trained(*args, **kwargs)
        stat = os.stat(data)
        os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        return result

    monkeypatch.setattr(finetune_module, "train_lora", train_then_rewrite)
    config = FinetuneConfig(base_model=str(base_dir), data=str(data), out=str(tmp_path / "run"), epochs=1, stream=True)
    with pytest.raises(SclError, match="the file changed while training read it"):
        finetune_module.finetune(config, progress=False)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("*.scl-tmp-*"))
