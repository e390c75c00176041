"""Annotation on Dask: lazy AnnData (anndata's read_lazy / read_elem_lazy) and files through `--dask local:N`, on a
real LocalCluster of worker processes, against the single-process run."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("distributed")
pytest.importorskip("xarray")  # anndata's lazy dataframes

from distributed import Client, LocalCluster  # noqa: E402

import scl  # noqa: E402
from scl.runtime.annotator import AnnotateOptions  # noqa: E402
from scl.runtime.expression import ReadOptions  # noqa: E402
from scl.runtime.file_driver import annotate_file  # noqa: E402

from conftest import run  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def single(exported, pbmc_path):
    """The single-process run on the in-memory file: what every dask run must equal."""
    return scl.Annotator(exported).annotate(ad.read_h5ad(pbmc_path), progress=False)


def same_result(result, single) -> None:
    assert list(result.cell_ids) == list(single.cell_ids)
    assert (result.calls["label"] == single.calls["label"]).all()
    assert np.abs(result.probabilities - single.probabilities).max() <= 1e-6
    assert np.abs(result.embedding - single.embedding).max() <= 1e-6
    for name, values in single.calls.items():
        assert np.array_equal(result.calls[name], values) or np.allclose(result.calls[name], values, atol=1e-6), name


def test_a_dask_array_without_a_client_is_read_chunk_by_chunk_in_this_process(exported, pbmc_path, single):
    """Runs before the module's cluster starts (the first Client made becomes everyone's default)."""
    import dask.array as da

    from scl.runtime.on_dask import active_client

    assert active_client() is None

    adata = ad.read_h5ad(pbmc_path)
    dense = adata.X.toarray()
    annotator = scl.Annotator(exported)
    in_memory = annotator.annotate(dense, genes=adata.var_names, cell_ids=adata.obs_names, progress=False)
    lazy = da.from_array(dense, chunks=(600, 2000))  # dense, and chunked along genes: rechunked with a note
    same_result(annotator.annotate(lazy, genes=adata.var_names, cell_ids=adata.obs_names, progress=False), in_memory)


def test_a_lazy_anndata_annotates_as_in_memory_with_and_without_a_cluster(exported, pbmc_path, single, client):
    lazy = ad.experimental.read_lazy(pbmc_path)
    assert type(lazy.X).__module__.startswith("dask")
    on_cluster = scl.Annotator(exported).annotate(lazy, progress=False)
    same_result(on_cluster, single)
    assert on_cluster.report["cells"] == 2800
    with h5py.File(pbmc_path) as f:  # read_elem_lazy with its own chunks, as anndata's docs build one
        x = ad.experimental.read_elem_lazy(f["X"], chunks=(700, -1))
        chunked = ad.AnnData(X=x, obs=ad.io.read_elem(f["obs"]), var=ad.io.read_elem(f["var"]))
        same_result(scl.Annotator(exported).annotate(chunked, progress=False), single)
        var = ad.io.read_elem(f["var"])
        var["symbol"] = var.index.to_numpy()
        var.index = [f"gene{i}" for i in range(len(var))]  # the symbols in a column: workers get the caller's resolved genes
        renamed = ad.AnnData(X=x, obs=ad.io.read_elem(f["obs"]), var=var)
        same_result(scl.Annotator(exported).annotate(renamed, gene_column="symbol", progress=False), single)


def test_lazy_results_are_dask_arrays_computed_once_per_chunk_on_the_cluster(exported, pbmc_path, single, client, tmp_path):
    """lazy=True: nothing runs until computed; embedding, probabilities and every column equal the in-memory run; the
    embedding writes to zarr; compute() is the eager result; a NaN stops the compute naming its cell."""
    import dask
    import dask.array as da

    lazy_adata = ad.experimental.read_lazy(pbmc_path)
    lazy = scl.Annotator(exported).annotate(lazy_adata, progress=False, lazy=True)
    assert isinstance(lazy.embedding, da.Array) and lazy.embedding.shape == single.embedding.shape
    assert lazy.embedding.numblocks[0] == lazy_adata.X.numblocks[0] and set(lazy.calls) == set(single.calls)
    embedding, probabilities, labels, *columns = dask.compute(lazy.embedding, lazy.probabilities, lazy.labels, *lazy.calls.values())
    assert np.abs(embedding - single.embedding).max() <= 1e-6 and np.abs(probabilities - single.probabilities).max() <= 1e-6
    assert list(labels) == list(single.predicted_labels)
    for name, values in zip(lazy.calls, columns):
        assert np.array_equal(values, single.calls[name]) or np.allclose(values, single.calls[name], atol=1e-6), name
    da.to_zarr(lazy.embedding, str(tmp_path / "embedding.zarr"))
    assert np.abs(da.from_zarr(str(tmp_path / "embedding.zarr")).compute() - single.embedding).max() <= 1e-6
    same_result(lazy.compute(), single)
    bad = nan_file(pbmc_path, tmp_path / "nan.h5ad", 2500)
    broken = scl.Annotator(exported).annotate(ad.experimental.read_lazy(tmp_path / "nan.h5ad"), progress=False, lazy=True)
    with pytest.raises(scl.SclError, match=bad):
        broken.labels.compute()
    with pytest.raises(scl.SclError, match="lazy=True needs dask-backed data"):
        scl.Annotator(exported).annotate(ad.read_h5ad(pbmc_path), lazy=True)
    with pytest.raises(scl.SclError, match="majority voting needs every cell at once"):
        scl.Annotator(exported).annotate(lazy_adata, majority_voting=True, lazy=True)


def test_a_lazy_result_runs_nothing_until_computed_and_each_chunk_once(exported, pbmc_path, monkeypatch):
    import dask

    import scl.runtime.on_dask as on_dask

    runs = []
    real = on_dask.annotate_cells
    monkeypatch.setattr(on_dask, "annotate_cells", lambda *args: runs.append(args[2]) or real(*args))
    lazy_adata = ad.experimental.read_lazy(pbmc_path)
    lazy = scl.Annotator(exported).annotate(lazy_adata, progress=False, lazy=True)
    assert runs == []
    with dask.config.set(scheduler="sync"):
        dask.compute(lazy.embedding, lazy.labels, lazy.calls["confidence"])
    assert sorted(runs) == sorted(np.cumsum((0,) + lazy_adata.X.chunks[0][:-1]).tolist())  # every chunk, once


def test_a_file_through_dask_local_2_equals_the_plain_run(exported, pbmc_path, tmp_path):
    for args, name in (([], "plain"), (["--dask", "local:2"], "dask")):
        code, _, stderr = run("scl-annotate", pbmc_path, "--model", exported, "--output", tmp_path / f"{name}.csv", "--probabilities",
                              "--alpha", "0.1", "--quiet", *args)
        assert code == 0, stderr
    assert (tmp_path / "plain.csv").read_text() == (tmp_path / "dask.csv").read_text()
    code, _, stderr = run("scl-annotate", pbmc_path, "--model", exported, "--output", tmp_path / "dask.h5ad", "--quiet", "--dask", "local:2")
    assert code == 0, stderr
    plain = scl.Annotator(exported).annotate(str(pbmc_path), progress=False)
    written = ad.read_h5ad(tmp_path / "dask.h5ad")
    assert (written.obs["scl_label"].astype(str).to_numpy() == plain.predicted_labels.astype(str)).all()
    assert np.abs(written.obsm["X_scl"] - plain.embedding).max() <= 1e-6


def nan_file(pbmc_path, path, row: int) -> str:
    adata = ad.read_h5ad(pbmc_path)
    x = adata.X.toarray()
    x[row, np.flatnonzero(x[row])[0]] = np.nan
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(path)
    return adata.obs_names[row]


def test_a_nan_in_a_worker_s_cells_is_refused_naming_the_cell_and_nothing_is_written(exported, pbmc_path, tmp_path, client):
    bad = nan_file(pbmc_path, tmp_path / "nan.h5ad", 2500)  # beyond the first block the caller reads itself
    code, _, stderr = run("scl-annotate", tmp_path / "nan.h5ad", "--model", exported, "--output", tmp_path / "out.csv", "--dask", "local:2", "--quiet")
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and bad in stderr and "NaN" in stderr, stderr
    assert not (tmp_path / "out.csv").exists() and os.listdir(tmp_path) == ["nan.h5ad"]
    lazy = ad.experimental.read_lazy(tmp_path / "nan.h5ad")
    with pytest.raises(scl.SclError, match=bad):
        scl.Annotator(exported).annotate(lazy, progress=False)


def test_a_worker_checks_its_cells_against_the_input_kind_the_caller_judged(exported, pbmc_path, tmp_path):
    """The first cells are counts; a later cell is log-normalised: refused on the worker, naming it."""
    adata = ad.read_h5ad(pbmc_path)
    x = adata.X.toarray()
    x[2600] = np.log1p(x[2600] / x[2600].sum() * 1e4)
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(tmp_path / "mixed.h5ad")
    code, _, stderr = run("scl-annotate", tmp_path / "mixed.h5ad", "--model", exported, "--output", tmp_path / "out.csv", "--dask", "local:1", "--quiet")
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and adata.obs_names[2600] in stderr and "mixes counts" in stderr, stderr
    assert not (tmp_path / "out.csv").exists()


def test_a_worker_refuses_a_model_file_that_is_not_the_caller_s(exported, pbmc_path):
    from dataclasses import replace

    from scl.runtime import on_dask

    annotator = scl.Annotator(exported)
    with annotator.open(str(pbmc_path)) as source:
        job = on_dask.make_job(annotator, AnnotateOptions(progress=False), source)
        ids = source.cell_ids
    with pytest.raises(scl.SclError, match="the file is closed; read its cell ids while it is open"):
        source.cell_ids
    block = on_dask.annotate_cells(job, str(pbmc_path), 10, 20)
    assert list(block.cell_ids) == list(ids[10:20])
    with pytest.raises(scl.SclError, match="not the caller's model"):
        on_dask.annotate_cells(replace(job, key="other", digest="0" * 64), str(pbmc_path), 0, 10)


def test_a_worker_killed_mid_run_has_its_cells_run_again_and_the_output_is_whole(exported, pbmc_path, tmp_path, client):
    """dask.distributed reruns a lost worker's tasks elsewhere: the output is the plain run's, cell for cell."""
    big = ad.concat([ad.read_h5ad(pbmc_path)] * 8, index_unique="-")  # 22,400 cells, in tasks of 700
    big.write_h5ad(tmp_path / "big.h5ad")
    plain = scl.Annotator(exported).annotate(str(tmp_path / "big.h5ad"), progress=False)
    pids = client.run(os.getpid)
    done_tasks = lambda dask_scheduler: sum(ts.state == "memory" and "annotate_cells" in str(ts.key) for ts in dask_scheduler.tasks.values())  # noqa: E731
    killed = []

    def kill_one_when_some_are_done():
        deadline = time.time() + 60
        while time.time() < deadline and client.run_on_scheduler(done_tasks) < 3:
            time.sleep(0.02)
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        killed.append(client.run_on_scheduler(done_tasks))

    killer = threading.Thread(target=kill_one_when_some_are_done)
    killer.start()
    report = annotate_file(str(tmp_path / "big.h5ad"), str(tmp_path / "out.csv"), scl.Annotator(exported), ReadOptions(),
                           AnnotateOptions(progress=False), client=client, task_cells=700)
    killer.join()
    assert killed and killed[0] < 32, "the worker was killed after the run ended"
    written = pd.read_csv(tmp_path / "out.csv", index_col=0)
    assert report.cells == 22400 and list(written.index) == list(plain.cell_ids)
    assert (written["label"].astype(str).to_numpy() == plain.predicted_labels.astype(str)).all()
    assert np.allclose(written["confidence"].to_numpy(), plain.calls["confidence"], atol=1e-5)


def test_int8_tasks_start_on_block_boundaries_so_the_output_equals_the_plain_run(exported, pbmc_path, tmp_path, client):
    """int8 scales each block's input as a whole, so a cell's result depends on its block: tasks of 700 cells start on
    multiples of the 256-cell blocks (768), and the CSV is byte for byte the plain run's."""
    int8 = exported.with_name("model.int8.onnx")
    code, _, stderr = run("scl-annotate", pbmc_path, "--model", int8, "--output", tmp_path / "plain.csv", "--probabilities", "--quiet")
    assert code == 0, stderr
    report = annotate_file(str(pbmc_path), str(tmp_path / "dask.csv"), scl.Annotator(int8), ReadOptions(), AnnotateOptions(progress=False),
                           probabilities=True, client=client, task_cells=700)
    assert report.cells == 2800 and (tmp_path / "plain.csv").read_text() == (tmp_path / "dask.csv").read_text()


def test_dask_refusals_are_one_line(exported, pbmc_path, small_data, tmp_path):
    code, _, stderr = run("scl-annotate", pbmc_path, "--model", exported, "--output", tmp_path / "o.csv", "--dask", "local:zero")
    assert code == 1 and "write local:N" in stderr and len(stderr.strip().splitlines()) == 1
    adata = ad.read_h5ad(pbmc_path)
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    code, _, stderr = run("scl-annotate", tmp_path / "csc.h5ad", "--model", exported, "--output", tmp_path / "o.csv", "--dask", "local:1")
    assert code == 1 and "CSC" in stderr and "tocsr" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "o.csv").exists()
