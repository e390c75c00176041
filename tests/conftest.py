from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
