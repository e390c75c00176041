"""Values exactly at a limit and just past it, rare but real input shapes, every refusal of a model's metadata, and
answers checked against an independent computation rather than against another scl path."""

import json
import math

import anndata as ad
import numpy as np
import onnx
import pytest
import scipy.sparse as sp
from onnx import numpy_helper

from scl.runtime.annotator import AnnotateOptions, Annotator
from scl.runtime.bounds import Bounds
from scl.runtime.calls import call_cells
from scl.runtime.errors import SclError
from scl.runtime.expression import ReadOptions
from scl.runtime.normalize import detect_input_kind, lognorm
from scl.runtime.session import Prediction
from scl.train.config import FinetuneConfig, PretrainConfig

from conftest import run

REQUIRED = {PretrainConfig: {"data": ["cells.h5ad"]}, FinetuneConfig: {"base_model": "base", "data": "cells.h5ad"},
            AnnotateOptions: {}, ReadOptions: {}}


def edge_values(bounds: Bounds) -> list[tuple[float, bool]]:
    """(value, accepted) at each end of the bounds and one step past it."""
    step = (lambda v, d: v + d) if bounds.whole else (lambda v, d: math.nextafter(v, v + d))
    cast = int if bounds.whole else float
    cases = [(cast(bounds.low), not bounds.low_open), (cast(step(bounds.low, -1)), False), (cast(step(bounds.low, 1)), True)]
    if bounds.high != math.inf:
        cases += [(cast(bounds.high), not bounds.high_open), (cast(step(bounds.high, 1)), False), (cast(step(bounds.high, -1)), True)]
    return cases


CASES = [(cls, name, value, accepted) for cls in REQUIRED for name, bounds in cls.BOUNDS.items() for value, accepted in edge_values(bounds)]


@pytest.mark.parametrize("cls, name, value, accepted", CASES, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v, _ in CASES])
def test_every_declared_bound_holds_exactly_at_its_limit(cls, name, value, accepted):
    make = lambda: cls(**REQUIRED[cls], **{name: value})  # noqa: E731
    if accepted:
        assert getattr(make(), name) == value
        return
    with pytest.raises(SclError) as err:
        make()
    bounds = cls.BOUNDS[name]
    text = str(err.value)
    assert text.startswith(f"{name} {value!r}: give {bounds.describe()}") and f"(see {name})" in text
    # the message never contradicts the value: a refused value lies outside what it says may be given
    assert not bounds.holds(value)


def test_bounds_describe_what_they_hold():
    assert Bounds(0, 1).describe() == "a number in [0, 1]" and Bounds(0, 1).holds(1.0) and Bounds(0, 1).holds(0.0)
    assert Bounds(0, 1, low_open=True, high_open=True).describe() == "a number in (0, 1)"
    assert Bounds(0, 2**32 - 1, whole=True).holds(2**32 - 1) and not Bounds(0, 2**32 - 1, whole=True).holds(2**32)


def test_input_kind_is_one_declared_choice_in_python(exported, pbmc_small):
    annotator = Annotator(exported)
    for bad in ("bogus", "LOGNORM", None, 1):
        with pytest.raises(SclError, match=r"input_kind .*: give one of auto, counts, lognorm"):
            annotator.annotate(pbmc_small, input_kind=bad, progress=False)


def test_a_lognorm_input_whose_first_cell_is_empty_is_still_lognorm():
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, size=(20, 300)).astype(np.float32)
    counts[0] = 0  # an empty cell first: its expm1 row sum is 0, not 1e4
    values = lognorm(counts.copy())
    kind, evidence = detect_input_kind(values, "cells")
    assert kind == "lognorm" and "10000" in evidence


def independent_second(probs):
    """Runner-up by a plain loop: the largest probability among the other classes, ties to the earlier class."""
    out = []
    for row in probs:
        best = int(np.argmax(row))
        others = [(p, -j) for j, p in enumerate(row) if j != best]
        out.append(-max(others)[1])
    return np.array(out)


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_second_label_and_probability_against_a_plain_loop(n_classes):
    rng = np.random.default_rng(n_classes)
    logits = rng.normal(size=(50, n_classes))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    embedding = rng.normal(size=(50, 4)).astype(np.float32)
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    calls = call_cells(Prediction(probs, embedding), np.eye(n_classes, 4, dtype=np.float32))
    second = independent_second(probs)
    assert (calls["second_label"] == second).all() and (calls["second_label"] != calls["label"]).all()
    np.testing.assert_array_equal(calls["second_probability"], probs[np.arange(50), second])
    assert (calls["second_probability"] <= calls["confidence"]).all()


def test_auto_prefers_layers_counts_over_a_lognormalised_raw(pbmc_small, exported, tmp_path):
    """scanpy's usual file: counts in layers/counts, log-normalised X kept as raw. auto must read the counts layer."""
    adata = pbmc_small[:60].copy()
    adata.layers["counts"] = adata.X.copy()
    normalised = adata.X.copy()
    normalised.data = np.log1p(normalised.data * np.repeat(1e4 / np.asarray(adata.X.sum(1)).ravel(), np.diff(normalised.indptr)))
    adata.X = normalised
    adata.raw = adata  # raw/X: log-normalised too
    adata.write_h5ad(tmp_path / "both.h5ad")
    code, _, stderr = run("scl-annotate", tmp_path / "both.h5ad", "--model", exported, "--output", tmp_path / "o.csv", "--report", tmp_path / "r.json", "--quiet")
    assert code == 0, stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input"]["matrix"] == "layers/counts" and report["input"]["input_kind"] == "counts"
    raw_only = adata.copy()
    del raw_only.layers["counts"]
    raw_only.raw = ad.AnnData(pbmc_small[:60].X.copy(), var=pbmc_small.var)  # counts kept as raw, X normalised
    raw_only.write_h5ad(tmp_path / "raw.h5ad")
    code, _, stderr = run("scl-annotate", tmp_path / "raw.h5ad", "--model", exported, "--output", tmp_path / "o2.csv", "--report", tmp_path / "r2.json", "--quiet")
    assert code == 0, stderr
    assert json.loads((tmp_path / "r2.json").read_text())["input"]["matrix"] == "raw/X"


def restamped(exported, tmp_path, name, change):
    """The exported model with its metadata changed and its digests stamped anew, so that the metadata check (not the
    digest) is what must refuse it."""
    from scl.export.onnx_file import save_unchecked
    from scl.runtime import model_metadata

    model = onnx.load(str(exported))
    values = model_metadata.parse({p.key: p.value for p in model.metadata_props}, "model")
    change(values)
    path = tmp_path / f"{name}.onnx"
    save_unchecked(model, values, path)
    return path


def narrower(v):
    v["centroids"] = [c[:-1] for c in v["centroids"]]


def wider(v):
    v["centroids"] = [c + [0.0] for c in v["centroids"]]


METADATA_CASES = {
    "centroids narrower than the embedding": (narrower, "scl.centroids are 15 wide but the embedding has 16 dimensions"),
    "centroids wider than the embedding": (wider, "scl.centroids are 17 wide but the embedding has 16 dimensions"),
    "a centroid missing": (lambda v: v.update(centroids=v["centroids"][:-1]), "scl.centroids is not 7 vectors of one width"),
    "a class named twice": (lambda v: v.update(classes=[v["classes"][0]] + v["classes"][:-1]), "scl.classes names one entry twice"),
    "a gene named twice": (lambda v: v.update(gene_order=[v["gene_order"][1]] + v["gene_order"][1:]), "scl.gene_order names one entry twice"),
    "novelty limits one short": (lambda v: v.update(novelty_limits={"values": [0.5] * 6}), "scl.novelty_limits does not hold one limit per class (7)"),
    "calibration of another width": (lambda v: v["calibration"].update(class_scores=v["calibration"]["class_scores"][:-1]),
                                     "scl.calibration does not hold calibration scores and distances for each of the 7 classes"),
    "calibration without a temperature": (lambda v: v["calibration"].update(temperature=0), "scl.calibration has no positive temperature"),
    "one class short of the graph": (lambda v: v.update(classes=v["classes"][:-1], centroids=v["centroids"][:-1]),
                                     "scl.classes lists 6 classes but the graph outputs 7"),
    "gene order one short of the graph": (lambda v: v.update(gene_order=v["gene_order"][1:]), "scl.gene_order lists 28230 genes but the graph reads 28231"),
    "format from the future": (lambda v: v.update(format_version=99), "model format 99 is newer than this scl reads"),
    "format not a number": (lambda v: v.update(format_version="1"), "scl.format_version is '1', not a number"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_every_metadata_check_refuses_a_model_that_trips_it(case, exported, small_data, tmp_path):
    change, words = METADATA_CASES[case]
    model = restamped(exported, tmp_path, case.replace(" ", "_"), change)
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", model, "--output", tmp_path / "o.csv", "--quiet")
    assert code == 1 and words in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "o.csv").exists()


def test_normalisation_and_embedding_against_numpy_from_the_initializers(exported, pbmc_small):
    """A few cells through the graph's own weights with numpy: align by name, log1p CP10k, each Linear (batch norm
    folded into it at export) and PReLU, L2 normalisation, head, softmax: an oracle that shares no code with scl's
    reading, normalising or calling."""
    model = onnx.load(str(exported))
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    slopes = [weights[n.input[1]].ravel()[0] for n in model.graph.node if n.op_type == "PRelu"]
    layers = sorted((k[: -len(".weight")] for k in weights if k.startswith("encoder.network.") and k.endswith(".weight")),
                    key=lambda k: int(k.split(".")[2]))
    annotator = Annotator(exported)
    cells = pbmc_small[:12]
    result = annotator.annotate(cells, progress=False)
    index = {g: i for i, g in enumerate(annotator.gene_order)}
    x = np.zeros((12, len(index)))
    counts = cells.X.toarray()
    for j, g in enumerate(cells.var_names):
        if g in index:
            x[:, index[g]] += counts[:, j]
    h = np.log1p(x * (1e4 / x.sum(1, keepdims=True)))
    for i, layer in enumerate(layers):
        h = h @ weights[f"{layer}.weight"].T + weights[f"{layer}.bias"]
        if i < len(slopes):
            h = np.where(h > 0, h, slopes[i] * h)
    embedding = h / np.linalg.norm(h, axis=1, keepdims=True)
    np.testing.assert_allclose(result.embedding, embedding, atol=2e-5)
    # the head: the embedding and the log1p values of the marker genes the metadata names, each weight found by its
    # shape (the exporter stores them transposed, temperature folded in)
    props = {p.key: p.value for p in model.metadata_props}
    markers = [index[g] for g in json.loads(props["scl.head_genes"])]
    head = {w.shape: w for name, w in weights.items() if not name.startswith("encoder.") and w.ndim == 2}
    classes = len(annotator.classes)
    logits = embedding @ head[(embedding.shape[1], classes)] + np.log1p(x * (1e4 / x.sum(1, keepdims=True)))[:, markers] @ head[(len(markers), classes)] + weights["head.bias"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(result.probabilities, probs, atol=2e-5)
    assigned = result.calls["label"] >= 0
    assert assigned.any() and (result.calls["label"][assigned] == np.argmax(probs, 1)[assigned]).all()
