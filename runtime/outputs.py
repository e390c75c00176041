"""Annotation outputs, written block by block so memory stays flat: CSV, or h5ad in anndata's encoding.

An .h5ad output is a copy of an .h5ad input with obs columns (scl_label, scl_confidence,
scl_second_label, scl_second_probability, scl_novelty), obsm['X_scl'] (the embedding),
optionally obsm['scl_probabilities'], and uns['scl'] (the run's report as JSON). From a text
input it is a new .h5ad with those and no X.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np

from .labels import UNASSIGNED, CellCalls, label_names

COLUMNS = ("scl_label", "scl_confidence", "scl_second_label", "scl_second_probability", "scl_novelty")
STR = h5py.string_dtype()


class CsvOutput:
    def __init__(self, tmp_path: str, classes: list[str], probabilities: bool):
        self.classes = classes
        self.fh = open(tmp_path, "w", newline="")
        header = ["cell_id", "label", "confidence", "second_label", "second_probability", "novelty"]
        header += [f"p_{c}" for c in classes] if probabilities else []
        self.fh.write(",".join(_csv(h) for h in header) + "\n")
        self.probabilities = probabilities

    def write(self, ids, calls: CellCalls, embedding: np.ndarray, probs: np.ndarray) -> None:
        labels, seconds = label_names(self.classes, calls.label), label_names(self.classes, calls.second_label)
        lines = []
        for i, cell in enumerate(ids):
            row = [_csv(str(cell)), _csv(labels[i]), f"{calls.confidence[i]:.5f}", _csv(seconds[i]), f"{calls.second_probability[i]:.5f}", f"{calls.novelty[i]:.5f}"]
            if self.probabilities:
                row += [f"{p:.5f}" for p in probs[i]]
            lines.append(",".join(row))
        self.fh.write("\n".join(lines) + "\n")

    def close(self, report: dict) -> None:
        self.fh.close()


def _csv(value: str) -> str:
    return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in ',"\n') else value


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


class H5adOutput:
    def __init__(self, tmp_path: str, input_h5ad: str | None, classes: list[str], latent: int, probabilities: bool):
        if input_h5ad:
            shutil.copyfile(input_h5ad, tmp_path)
        self.file = h5py.File(tmp_path, "r+" if input_h5ad else "w")
        self.classes = classes
        self.new_file = input_h5ad is None
        if self.new_file:
            self._skeleton()
        obs = self.file["obs"]
        for name in COLUMNS:
            if name in obs:
                del obs[name]  # re-annotating replaces the previous calls
        categories = np.array(list(classes) + [UNASSIGNED], dtype=object)
        self.columns = {}
        for name in COLUMNS:
            if name in ("scl_label", "scl_second_label"):
                group = obs.create_group(name)
                _attrs(group, "categorical", ordered=False)
                _attrs(group.create_dataset("categories", data=categories, dtype=STR), "string-array")
                self.columns[name] = _growable(group, "codes", np.int16)
            else:
                self.columns[name] = _growable(obs, name, np.float32)
        order = [str(c) for c in obs.attrs.get("column-order", []) if str(c) not in COLUMNS]
        obs.attrs["column-order"] = np.array(order + list(COLUMNS), dtype=STR)
        obsm = self.file.require_group("obsm")
        _attrs(obsm, "dict", "0.1.0")
        for key in ("X_scl", "scl_probabilities"):
            if key in obsm:
                del obsm[key]
        self.embedding = _growable(obsm, "X_scl", np.float32, latent)
        self.probabilities = _growable(obsm, "scl_probabilities", np.float32, len(classes)) if probabilities else None

    def _skeleton(self) -> None:
        _attrs(self.file, "anndata", "0.1.0")
        for name in ("obs", "var"):
            group = self.file.create_group(name)
            _attrs(group, "dataframe", _index="_index", **{"column-order": np.array([], dtype=STR)})
        _growable(self.file["obs"], "_index", STR)
        _attrs(self.file["var"].create_dataset("_index", shape=(0,), dtype=STR), "string-array")
        for name in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            _attrs(self.file.create_group(name), "dict", "0.1.0")

    def write(self, ids, calls: CellCalls, embedding: np.ndarray, probs: np.ndarray) -> None:
        if self.new_file:
            _append(self.file["obs/_index"], np.asarray(ids, dtype=object))
        n = len(self.classes)
        _append(self.columns["scl_label"], np.where(calls.label < 0, n, calls.label).astype(np.int16))
        _append(self.columns["scl_second_label"], calls.second_label.astype(np.int16))
        for name, values in (("scl_confidence", calls.confidence), ("scl_second_probability", calls.second_probability), ("scl_novelty", calls.novelty)):
            _append(self.columns[name], values.astype(np.float32))
        _append(self.embedding, embedding.astype(np.float32))
        if self.probabilities is not None:
            _append(self.probabilities, probs.astype(np.float32))

    def close(self, report: dict) -> None:
        uns = self.file.require_group("uns")
        _attrs(uns, "dict", "0.1.0")
        if "scl" in uns:
            del uns["scl"]
        group = uns.create_group("scl")
        _attrs(group, "dict", "0.1.0")
        for key, value in (("report_json", json.dumps(report)), ("model", report["model"]["path"]), ("provider", report["model"]["provider"])):
            ds = group.create_dataset(key, data=value, dtype=STR)
            _attrs(ds, "string")
        self.file.close()
