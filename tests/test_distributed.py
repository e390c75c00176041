"""scl-train under torchrun: two gloo processes on this CPU write one run that annotates like the one-process run,
and a killed process ends the run with no run folder."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import BIN, run

pytestmark = pytest.mark.xdist_group("torchrun")  # one test process builds the module's runs and starts the torchruns

# the same run on one and on two processes; cross-entropy only and no dropout, so that nothing random differs between
# them (triplets are mined within each process's share of a batch, and dropout masks are drawn per process)
SAME_RUN = ("--epochs", "3", "--patience", "3", "--loss", "ce", "--lora-dropout", "0", "--head-genes", "0", "--batch-size", "32", "--quiet")


def torchrun(*args, processes: int = 2, **popen):
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(processes), "-m", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, **popen)


def predictions(run_dir, cells_path):
    """Probabilities of the run's model (merged encoder and head) for the cells of an .h5ad, in torch."""
    import torch

    from scl.train.data import embed, load_labelled
    from scl.train.head import head_logits
    from scl.train.run_dir import load_run

    trained = load_run(run_dir)
    cells = load_labelled(str(cells_path), trained.model.gene_order, "cell_type")
    z = embed(trained.model.encoder.eval(), cells.x, torch.device("cpu"))
    return torch.softmax(torch.from_numpy(head_logits(trained.head, z, cells.x)), dim=1).numpy()


def one_and_two_runs(base_dir, small_data, d, *extra):
    """The same run (SAME_RUN and `extra`) on one process and on two under torchrun: (run one, run two, torchrun's stdout)."""
    args = ("--base-model", base_dir, "--data", small_data / "train.h5ad", "--val-data", small_data / "val.h5ad", *SAME_RUN, *extra)
    code, _, stderr = run("scl-train", *args, "--out", d / "one")
    assert code == 0, stderr
    two = torchrun("scl.train.finetune_cli", *args, "--out", d / "two")
    stdout, stderr = two.communicate(timeout=600)
    assert two.returncode == 0, stderr
    return d / "one", d / "two", stdout


def assert_the_runs_agree(one, two, stdout, small_data):
    import json

    assert stdout.count("trainable parameters:") == 1  # rank 0 reports; the other process says nothing
    metrics_one, metrics_two = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert metrics_one["processes"] == {"processes": 1, "backend": None}
    assert metrics_two["processes"] == {"processes": 2, "backend": "gloo"}
    # the same steps up to the order of floating-point sums: the same losses, the same epochs
    for row_one, row_two in zip(metrics_one["history"], metrics_two["history"], strict=True):
        assert abs(row_one["ce"] - row_two["ce"]) < 1e-4  # the processes' means of their halves: the whole batches'
        assert abs(row_one["val_loss"] - row_two["val_loss"]) < 1e-4 and row_one["val_macro_f1"] == row_two["val_macro_f1"]
        assert row_two["cells_a_process"] == row_one["cells_a_process"] // 2  # each process stepped through its half
    p_one, p_two = predictions(one, small_data / "val.h5ad"), predictions(two, small_data / "val.h5ad")
    assert (p_one.argmax(axis=1) == p_two.argmax(axis=1)).all()
    assert np.abs(p_one - p_two).max() < 1e-3
    assert not [p for p in two.parent.iterdir() if ".scl-tmp-" in p.name]


def test_two_gloo_processes_write_one_run_that_annotates_like_one_process(base_dir, small_data, tmp_path):
    assert_the_runs_agree(*one_and_two_runs(base_dir, small_data, tmp_path), small_data)


def test_two_processes_streaming_their_shares_train_like_one(base_dir, small_data, tmp_path):
    """--stream: each process reads only its share of every batch from the file; the runs agree as in memory."""
    assert_the_runs_agree(*one_and_two_runs(base_dir, small_data, tmp_path, "--stream"), small_data)


def test_a_killed_process_ends_the_run_with_no_run_folder(base_dir, small_data, tmp_path):
    out = tmp_path / "run"
    job = torchrun("scl.train.finetune_cli", "--base-model", base_dir, "--data", small_data / "train.h5ad", "--out", out,
                   "--epochs", "200", "--patience", "200", "--batch-size", "8", start_new_session=True)
    try:
        rank_1 = wait_for_rank(job.pid, 1)
        time.sleep(8)  # into training: the processes have joined and load their cells
        os.kill(rank_1, signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "exitcode  : -9" in stderr or "Signal 9" in stderr  # torchrun's summary names the killed process
    assert not out.exists() and not list(tmp_path.iterdir())  # no run folder, whole or half, and no temporary one


def wait_for_rank(torchrun_pid: int, rank: int, seconds: float = 60) -> int:
    """The pid of torchrun's worker process of `rank` (torchrun gives each its RANK in the environment)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split()
        for pid in map(int, children):
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"torchrun started no process of rank {rank} in {seconds} s")


def test_scl_pretrain_under_torchrun_writes_one_base(small_data, scimilarity_genes, tmp_path):
    import json

    from scl.train.model_dir import load_model_dir
    from conftest import shared_file

    job = torchrun("scl.train.pretrain_cli", "--data", small_data / "train.h5ad", "--data", small_data / "brain.h5ad",
                   "--gene-order", shared_file("scimilarity_gene_order.tsv"), "--out", tmp_path / "base", "--hidden", "64,32",
                   "--latent", "16", "--epochs", "2", "--batch-size", "64")
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    assert stdout.count("wrote ") == 1
    summary = json.loads((tmp_path / "base" / "pretrain.json").read_text())
    assert summary["processes"] == {"processes": 2, "backend": "gloo"} and len(summary["history"]) == 2
    assert load_model_dir(tmp_path / "base").gene_order == scimilarity_genes
