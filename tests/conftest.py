import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BIN = Path(sys.executable).parent


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is not here (tests read ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def scimilarity_genes() -> list[str]:
    return shared_file("scimilarity_gene_order.tsv").read_text().split()


@pytest.fixture(scope="session")
def pbmc_path() -> Path:
    return shared_file("pbmc_sorted_dev.h5ad")


@pytest.fixture(scope="session")
def brain_path() -> Path:
    return shared_file("darmanis_brain_466.h5ad")


@pytest.fixture(scope="session")
def csv_path() -> Path:
    return shared_file("celltypist_sample_559cells.csv.gz")


@pytest.fixture(scope="session")
def pbmc_small(pbmc_path):
    """120 real PBMC cells (every 7 populations), as an in-memory AnnData with CSR float32 counts."""
    import anndata as ad

    adata = ad.read_h5ad(pbmc_path)
    pick = np.concatenate([np.flatnonzero(adata.obs["cell_type"] == c)[:17] for c in adata.obs["cell_type"].cat.categories])
    return adata[np.sort(pick)].copy()


def run(*args):
    """Run one of scl's console scripts; (exit code, stdout, stderr)."""
    out = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True)
    return out.returncode, out.stdout, out.stderr


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, pbmc_path, brain_path):
    """40 PBMC cells per population split 30/10 per class, and 14 brain cells per type, as h5ad files."""
    d = tmp_path_factory.mktemp("data")
    pbmc = ad.read_h5ad(pbmc_path)
    rng = np.random.default_rng(0)
    train, val = [], []
    for c in pbmc.obs["cell_type"].cat.categories:
        idx = rng.permutation(np.flatnonzero(pbmc.obs["cell_type"] == c))[:40]
        train += list(idx[:30])
        val += list(idx[30:])
    pbmc[sorted(train)].copy().write_h5ad(d / "train.h5ad")
    pbmc[sorted(val)].copy().write_h5ad(d / "val.h5ad")
    brain = ad.read_h5ad(brain_path)
    pick = [i for c in brain.obs["cell_type"].unique() for i in np.flatnonzero(brain.obs["cell_type"] == c)[:14]]
    brain[sorted(pick)].copy().write_h5ad(d / "brain.h5ad")
    return d


@pytest.fixture(scope="session")
def base_dir(small_data, scimilarity_genes, tmp_path_factory):

    out = tmp_path_factory.mktemp("base") / "base"
    code, stdout, stderr = run("scl-pretrain", "--data", small_data / "train.h5ad", "--data", small_data / "brain.h5ad",
                               "--gene-order", shared_file("scimilarity_gene_order.tsv"), "--out", out,
                               "--hidden", "64,32", "--latent", "16", "--epochs", "2", "--batch-size", "64")
    assert code == 0, stderr
    assert "28231 genes -> [64, 32] -> 16" in stdout
    (out.parent / "stderr.txt").write_text(stderr)
    return out


@pytest.fixture(scope="session")
def run_dir(base_dir, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    code, stdout, stderr = run("scl-train", "--base-model", base_dir, "--data", small_data / "train.h5ad",
                               "--val-data", small_data / "val.h5ad", "--forgetting-data", small_data / "brain.h5ad",
                               "--out", out, "--epochs", "2", "--ablation")
    assert code == 0, stderr
    assert "trainable parameters:" in stdout and "sanity checks passed" in stdout and "calibration: the " in stdout and "prediction sets held the true type" in stdout
    assert "LoRA" in stderr  # progress bars
    return out



@pytest.fixture(scope="session")
def exported(run_dir, tmp_path_factory):
    """model.onnx, model.int8.onnx and model.fp16.onnx exported from the small trained run."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    code, stdout, stderr = run("scl-export", run_dir, "--out", out, "--quantize", "int8", "--fp16", "--sample-cells", "70")
    assert code == 0, stderr
    (out.parent / "stderr.txt").write_text(stderr)
    return out
