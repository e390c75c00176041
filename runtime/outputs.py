"""Annotation outputs, written block by block so memory stays flat: CSV, or h5ad in anndata's encoding.

Each has write(block), add_columns, close(report dict) and abort(); annotate.FileSink makes either a pipeline sink.

Both write the columns declared in calls.py, as result.py names them for AnnData. An .h5ad output is a copy of an
.h5ad input with obs columns scl_<column>, obsm['X_scl'] (the embedding), optionally obsm['scl_probabilities'], and
uns['scl'] (the run's report as JSON). From a text input it is a new .h5ad with those and no X.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import gc
import json
import os
import shutil

import h5py
import numpy as np

from .calls import ALL_COLUMNS, REASON_CATEGORIES, UNASSIGNED, Column, as_values
from .result import embedding_key, obs_name, probabilities_key

STR = h5py.string_dtype()
KEY = "scl"  # key_added of files: obs scl_label, obsm X_scl, uns scl


def _text(column: Column, values: np.ndarray, classes: list[str]) -> list[str]:
    if column.kind == "float":
        return [f"{v:.5f}" for v in values]
    return [str(v) for v in as_values(column, values, classes)]


ADD_CHUNK = 100_000  # rows per step when columns are added to a written CSV


class CsvOutput:
    """One row per cell: cell_id, then the columns, then p_<class> with probabilities."""

    def __init__(self, tmp_path: str, classes: list[str], columns: list[Column], probabilities: bool):
        self.path, self.classes, self.columns, self.probabilities = tmp_path, classes, columns, probabilities
        self.fh = open(tmp_path, "w", newline="")
        self.writer = csv.writer(self.fh, lineterminator="\n")
        header = ["cell_id"] + [c.name for c in columns] + ([f"p_{c}" for c in classes] if probabilities else [])
        self.writer.writerow(header)

    def write(self, block) -> None:
        fields = [list(map(str, block.cell_ids))] + [_text(c, block.calls[c.name], self.classes) for c in self.columns]
        if self.probabilities:
            probs = block.probabilities
            fields += [[f"{p:.5f}" for p in probs[:, j]] for j in range(probs.shape[1])]
        self.writer.writerows(zip(*fields))

    def add_columns(self, columns: list[Column], values: dict) -> None:
        """Append columns computed over all cells (majority voting): one more streaming pass over the rows."""
        self.fh.close()
        n = len(values[columns[0].name])
        with open(self.path, newline="") as src, open(self.path + ".more", "w", newline="") as dst:
            reader, writer = csv.reader(src), csv.writer(dst, lineterminator="\n")
            writer.writerow(next(reader) + [c.name for c in columns])
            for start in range(0, n, ADD_CHUNK):  # the new columns as text a chunk at a time: 10^8 cells' would be gigabytes
                extra = [_text(c, values[c.name][start : start + ADD_CHUNK], self.classes) for c in columns]
                writer.writerows(row + list(more) for row, *more in zip(itertools.islice(reader, ADD_CHUNK), *extra))
        os.replace(self.path + ".more", self.path)
        self.fh = open(self.path, "a")

    def close(self, report: dict) -> None:
        self.fh.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()


def _attrs(elem, kind: str, version: str = "0.2.0", **extra) -> None:
    elem.attrs["encoding-type"] = kind
    elem.attrs["encoding-version"] = version
    for k, v in extra.items():
        elem.attrs[k] = v


def _growable(group, name: str, dtype, width: int | None = None):
    shape, maxshape = ((0, width), (None, width)) if width else ((0,), (None,))
    ds = group.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype, chunks=True)
    _attrs(ds, "string-array" if dtype is STR else "array")
    return ds


def _append(ds, values) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


def _categorical(obs, name: str, categories: np.ndarray):
    group = obs.create_group(name)
    _attrs(group, "categorical", ordered=False)
    _attrs(group.create_dataset("categories", data=np.asarray(categories, dtype=object), dtype=STR), "string-array")
    return group


class H5adOutput:
    def __init__(self, tmp_path: str, input_h5ad: str | None, classes: list[str], columns: list[Column], latent: int, probabilities: bool):
        if input_h5ad:
            shutil.copyfile(input_h5ad, tmp_path)
        self.file = h5py.File(tmp_path, "r+" if input_h5ad else "w")
        self.classes, self.columns = classes, columns
        self.new_file = input_h5ad is None
        if self.new_file:
            self._skeleton()
        obs = self.obs = self.file["obs"]
        previous = [obs_name(KEY, c) for c in ALL_COLUMNS]
        for name in previous:
            if name in obs:
                del obs[name]  # re-annotating replaces the previous calls, all of them
        self._column_order([], dropped=previous)
        self.datasets = {c.name: self._column(c) for c in columns}
        self._column_order([obs_name(KEY, c) for c in columns])
        obsm = self.file.require_group("obsm")
        _attrs(obsm, "dict", "0.1.0")
        for key in (embedding_key(KEY), probabilities_key(KEY)):
            if key in obsm:
                del obsm[key]
        self.embedding = _growable(obsm, embedding_key(KEY), np.float32, latent)
        self.probabilities = _growable(obsm, probabilities_key(KEY), np.float32, len(classes)) if probabilities else None

    def _column(self, column: Column):
        name = obs_name(KEY, column)
        if column.kind == "label":
            return _growable(_categorical(self.obs, name, list(self.classes) + [UNASSIGNED]), "codes", np.int16)
        if column.kind == "reason":
            return _growable(_categorical(self.obs, name, list(REASON_CATEGORIES)), "codes", np.int8)
        return _growable(self.obs, name, {"float": np.float32, "int": np.int32, "set": STR, "text": STR}.get(column.kind, bool))

    def _column_order(self, names: list[str], dropped: list[str] = ()) -> None:
        """obs's column-order ends with `names`; a name listed there without its column makes anndata fail to read."""
        order = [str(c) for c in self.obs.attrs.get("column-order", []) if str(c) not in names and str(c) not in dropped]
        self.obs.attrs["column-order"] = np.array(order + names, dtype=STR)

    def _skeleton(self) -> None:
        _attrs(self.file, "anndata", "0.1.0")
        for name in ("obs", "var"):
            group = self.file.create_group(name)
            _attrs(group, "dataframe", _index="_index", **{"column-order": np.array([], dtype=STR)})
        _growable(self.file["obs"], "_index", STR)
        _attrs(self.file["var"].create_dataset("_index", shape=(0,), dtype=STR), "string-array")
        for name in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            _attrs(self.file.create_group(name), "dict", "0.1.0")

    def write(self, block) -> None:
        if self.new_file:
            _append(self.file["obs/_index"], np.asarray(block.cell_ids, dtype=object))
        n = len(self.classes)
        for column in self.columns:
            values = block.calls[column.name]
            if column.kind == "label":
                values = np.where(values < 0, n, values).astype(np.int16)  # -1 (unassigned) is the last category
            _append(self.datasets[column.name], values)
        _append(self.embedding, block.embedding.astype(np.float32))
        if self.probabilities is not None:
            _append(self.probabilities, block.probabilities.astype(np.float32))

    def add_columns(self, columns: list[Column], values: dict) -> None:
        """Columns computed over all cells (majority voting), written whole."""
        for column in columns:
            name = obs_name(KEY, column)
            if column.kind == "category":
                categories, codes = np.unique(np.asarray(values[column.name], dtype=str), return_inverse=True)
                _attrs(_categorical(self.obs, name, categories).create_dataset("codes", data=codes.astype(np.int32)), "array")
            else:
                _attrs(self.obs.create_dataset(name, data=np.asarray(values[column.name], dtype=np.float32)), "array")
        self._column_order([obs_name(KEY, c) for c in self.columns + list(columns)])

    def close(self, report: dict) -> None:
        uns = self.file.require_group("uns")
        _attrs(uns, "dict", "0.1.0")
        if KEY in uns:
            del uns[KEY]
        group = uns.create_group(KEY)
        _attrs(group, "dict", "0.1.0")
        for key, value in (("report_json", json.dumps(report)), ("model", report["model"]["path"]), ("provider", report["model"]["provider"])):
            ds = group.create_dataset(key, data=value, dtype=STR)
            _attrs(ds, "string")
        self.file.close()

    def abort(self) -> None:
        """Close a file that failed part-way, whatever state it is in (the caller removes it). Its datasets are dropped
        first: left to the garbage collector after a failed write (disk full), libhdf5 crashed the process (rc 139)."""
        self.datasets, self.embedding, self.probabilities, self.obs = {}, None, None, None
        gc.collect()
        with contextlib.suppress(Exception):
            self.file.close()
