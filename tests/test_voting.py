"""Majority voting's automatic over-clustering at any size: centres from a sample above voting.FIT_CELLS, and the
embedding it clusters kept in an unnamed temporary file by scl-annotate (result.BlockCollector on_disk)."""

import errno
import os
import tempfile

import numpy as np
import pytest

import scl.runtime.result as result
import scl.runtime.voting as voting
from scl.runtime.errors import SclError


def separated_embedding(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors around k orthogonal directions, each cell's true group beside it."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, k, n)
    z = np.eye(k, 128)[group] + 0.05 * rng.standard_normal((n, 128))
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32), group


def pure(clusters: np.ndarray, group: np.ndarray) -> bool:
    """Every cluster holds cells of one group (what voting needs of an over-clustering), and every group has a cluster."""
    pairs = set(zip(clusters.tolist(), group.tolist()))
    return len(pairs) == len(set(clusters.tolist())) and len({g for _, g in pairs}) == len(set(group.tolist()))


def test_above_fit_cells_the_centres_come_from_a_sample_and_every_cell_is_assigned(monkeypatch, tmp_path):
    z, group = separated_embedding(3000, 10)
    whole = voting.over_cluster(z, n_clusters=20)
    assert pure(whole, group)
    monkeypatch.setattr(voting, "FIT_CELLS", 400)
    monkeypatch.setattr(voting, "PREDICT_CHUNK", 256)
    from sklearn.cluster import MiniBatchKMeans

    fitted, fit = [], MiniBatchKMeans.fit
    monkeypatch.setattr(MiniBatchKMeans, "fit", lambda self, x, *a, **k: fitted.append(len(x)) or fit(self, x, *a, **k))
    on_disk = np.memmap(tmp_path / "z.f32", dtype=np.float32, mode="w+", shape=z.shape)
    on_disk[:] = z
    sampled = voting.over_cluster(on_disk, n_clusters=20)
    assert len(sampled) == 3000 and pure(sampled, group) and fitted == [400]  # the centres saw the sample only
    assert len({id(name) for name in sampled}) == len(set(sampled)) <= 20  # one string object per cluster, not one per cell


def test_blocks_kept_on_disk_come_back_whole_and_leave_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal((n, 128)).astype(np.float32) for n in (5, 256, 17)]
    for n_cells in (278, None):  # an obs index gives the count; a text file does not
        collector = result.BlockCollector(n_cells, on_disk=("embedding",))
        for b in blocks:
            collector.add({"label": np.arange(len(b)), "embedding": b})
        kept = collector.arrays()
        assert isinstance(kept["embedding"], np.memmap) and not isinstance(kept["label"], np.memmap)
        np.testing.assert_array_equal(kept["embedding"], np.vstack(blocks))
        assert os.listdir(tmp_path) == []  # unnamed: nothing to leave behind, even when the run is killed
        collector.close()


def test_a_full_temporary_disk_is_named_in_one_line(monkeypatch):
    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: Full())
    collector = result.BlockCollector(10, on_disk=("embedding",))
    with pytest.raises(SclError, match=r"cannot write the temporary embedding that majority voting clusters \(No space left on device; "
                                       r"it takes 512 bytes a cell\); free space there or point TMPDIR at a folder with room"):
        collector.add({"embedding": np.zeros((10, 128), np.float32)})


def test_voting_columns_join_a_written_csv_row_for_row_across_chunks(tmp_path, monkeypatch):
    import csv

    import scl.runtime.outputs as outputs
    from scl.runtime.calls import VOTING_COLUMNS
    from scl.runtime.pipeline import AnnotatedBlock

    monkeypatch.setattr(outputs, "ADD_CHUNK", 7)
    out = outputs.CsvOutput(str(tmp_path / "o.csv"), ["a", "b"], [], probabilities=False)
    for start in (0, 12, 25):  # blocks of 12, 13 and 5 cells
        ids = np.array([f"c{i}" for i in range(start, {0: 12, 12: 25, 25: 30}[start])], dtype=object)
        out.write(AnnotatedBlock(ids, {}, np.zeros((len(ids), 4)), np.zeros((len(ids), 2))))
    votes = {"cluster": np.array([str(i // 4) for i in range(30)], dtype=object), "majority_label": np.array(["a", "b"] * 15, dtype=object),
             "majority_share": np.arange(30) / 30}
    out.add_columns(list(VOTING_COLUMNS), votes)
    out.close({})
    rows = list(csv.reader(open(tmp_path / "o.csv")))
    assert rows[0] == ["cell_id", "cluster", "majority_label", "majority_share"] and len(rows) == 31
    assert all(r == [f"c{i}", str(i // 4), "ab"[i % 2], f"{i / 30:.5f}"] for i, r in enumerate(rows[1:]))
