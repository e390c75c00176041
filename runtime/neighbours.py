"""Nearest reference cells by cosine distance on unit embeddings: exact (numpy) for small references, an HNSW graph
(hnswlib, the optional `scl[reference]` extra) for large ones. Both answer `search(queries, k)` with
(row indices [n, k], cosine distances [n, k]), nearest first.

hnswlib was chosen by measurement (benchmarks/ann_libraries.py, 2 cores, the same HNSW settings for all): the same
recall as faiss-cpu and usearch at every size and search breadth; the fastest to build (100k cells 8 s, 1M 294 s,
against faiss 13 s / 348 s and usearch 12 s / 856 s) and to query at 100k; at 1M faiss answers 1.5x as many queries
per second at equal recall. hnswlib installs in 8 MB (faiss 65 MB, usearch 56 MB) and reads SCimilarity's own
`labelled_kNN.bin`, which the import needs anyway; its last release is from 2023.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import SclError

# "auto" searches exactly up to this many reference cells. Exact search answers about 6e7 / cells queries a second on
# 2 cores (612 at 100k, 54 at 1M): some 6,000 at 10k, above the model's own fp32 rate (about 3,000 cells/s); beyond
# it an HNSW graph is faster (8,752 at 100k, ef 256) at recall 0.9999.
EXACT_UP_TO = 10_000
# recall@50 at ef 256: 0.9999 at 100k cells, 0.993 at 1M (ef 128: 0.9995 and 0.966); benchmarks/ann_libraries.py
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF = 32, 200, 256
EXACT_FILE, HNSW_FILE = "embedding.npy", "index.hnsw"


def hnswlib_module():
    try:
        import hnswlib
    except ImportError:
        raise SclError("this reference uses an HNSW index, which needs hnswlib: pip install 'scl[reference]'.") from None
    return hnswlib


class ExactIndex:
    """Every reference cell compared with every query: exact, and fast enough below EXACT_UP_TO cells."""

    kind = "exact"

    def __init__(self, embedding: np.ndarray):
        self.embedding = np.ascontiguousarray(embedding, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.embedding)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        scores = np.asarray(queries, dtype=np.float32) @ self.embedding.T
        if allowed is not None:
            scores[:, ~allowed] = -np.inf
        k = min(k, len(self) if allowed is None else int(allowed.sum()))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(self) else np.tile(np.arange(len(self)), (len(scores), 1))
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1).astype(np.int64), np.maximum(0.0, 1.0 - np.take_along_axis(top_scores, order, axis=1))

    def vectors(self) -> np.ndarray:
        return self.embedding

    def save(self, folder: str) -> dict:
        np.save(os.path.join(folder, EXACT_FILE), self.embedding)
        return {"kind": self.kind}

    @classmethod
    def load(cls, folder: str, params: dict, n: int, dim: int) -> ExactIndex:
        return cls(np.load(os.path.join(folder, EXACT_FILE), mmap_mode="r", allow_pickle=False))


class HnswIndex:
    """An hnswlib cosine graph; `ef` is the search breadth (at least k is used)."""

    kind = "hnsw"

    def __init__(self, index, ef: int = HNSW_EF, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION):
        self.index, self.ef, self.m, self.ef_construction = index, ef, m, ef_construction

    @classmethod
    def build(cls, embedding: np.ndarray, threads: int, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION) -> HnswIndex:
        hnswlib = hnswlib_module()
        index = hnswlib.Index(space="cosine", dim=embedding.shape[1])
        index.init_index(max_elements=len(embedding), M=m, ef_construction=ef_construction, random_seed=0)
        index.add_items(np.asarray(embedding, dtype=np.float32), np.arange(len(embedding)), num_threads=threads)
        return cls(index, HNSW_EF, m, ef_construction)

    def __len__(self) -> int:
        return self.index.get_current_count()

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self) if allowed is None else int(allowed.sum()))
        self.index.set_ef(max(self.ef, k))
        keep = None if allowed is None else (lambda row: bool(allowed[row]))  # hnswlib's filter: called per visited cell
        labels, distances = self.index.knn_query(np.asarray(queries, dtype=np.float32), k=k, num_threads=1, filter=keep)
        return labels.astype(np.int64), np.maximum(0.0, distances)

    def vectors(self) -> np.ndarray:
        return np.asarray(self.index.get_items(np.arange(len(self))), dtype=np.float32)

    def save(self, folder: str) -> dict:
        self.index.save_index(os.path.join(folder, HNSW_FILE))
        return {"kind": self.kind, "M": self.m, "ef_construction": self.ef_construction, "ef": self.ef}

    @classmethod
    def load(cls, folder: str, params: dict, n: int, dim: int, file: str = HNSW_FILE) -> HnswIndex:
        path = os.path.join(folder, file)
        stored, count = hnsw_file_shape(path)
        if stored != dim or count != n:
            raise SclError(f"{path}: the index holds {count:,} vectors of {stored} dimensions, but {n:,} cells of the model's {dim} are "
                           "expected; it belongs to another model or list of cells.", "reference")
        hnswlib = hnswlib_module()
        index = hnswlib.Index(space="cosine", dim=dim)
        try:
            index.load_index(path, max_elements=n)
        except RuntimeError as err:
            raise SclError(f"{path}: not a readable hnswlib index ({err}).", "reference") from None
        return cls(index, int(params.get("ef", HNSW_EF)), int(getattr(index, "M", params.get("M", HNSW_M))),
                   int(getattr(index, "ef_construction", params.get("ef_construction", HNSW_EF_CONSTRUCTION))))


def hnsw_file_shape(path: str) -> tuple[int, int]:
    """(dimensions, vectors) from an hnswlib file's header: hnswlib itself loads a file of another width without a
    word and answers with garbage. The header opens with six 64-bit fields: offsetLevel0, max_elements, element
    count, size per element, label offset, data offset; the vector's bytes lie between the last two."""
    import struct

    with open(path, "rb") as fh:
        header = fh.read(48)
    if len(header) < 48:
        raise SclError(f"{path}: too short to be an hnswlib index.", "reference")
    _, _, count, _, label_offset, data_offset = struct.unpack("<6Q", header)
    return (label_offset - data_offset) // 4, count


KINDS = {"exact": ExactIndex, "hnsw": HnswIndex}


def build_index(embedding: np.ndarray, kind: str, threads: int):
    """`kind` "auto": exact up to EXACT_UP_TO cells, else HNSW."""
    if kind == "auto":
        kind = "exact" if len(embedding) <= EXACT_UP_TO else "hnsw"
    if kind not in KINDS:
        raise SclError(f"index {kind!r}: choose auto, exact or hnsw.", "index")
    return ExactIndex(embedding) if kind == "exact" else HnswIndex.build(embedding, threads)
