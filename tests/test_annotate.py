"""scl-annotate end to end: real files, every layout, outputs users open, and bad input."""

import hashlib
import json
import os
import shutil

import anndata as ad
import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from scl.runtime.expression import ExpressionSource
from scl.train.run_dir import load_run

from conftest import run
from test_readers import LAYOUTS


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def annotate(*args):
    code, stdout, stderr = run("scl-annotate", *args, "--quiet")
    assert code == 0, stderr
    return stdout


def test_labels_match_torch_and_the_h5ad_output_opens_in_anndata(exported, run_dir, small_data, tmp_path):
    val = small_data / "val.h5ad"
    before = digest(val)
    # small blocks, three in flight at once: the calls must still come back in the file's order
    annotate(val, "--model", exported, "--output", tmp_path / "out.h5ad", "--probabilities", "--report", tmp_path / "r.json", "--batch-size", "16", "--threads", "3")
    assert digest(val) == before  # the input is never modified
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    source = ad.read_h5ad(val)
    assert list(out.obs_names) == list(source.obs_names) and out.shape == source.shape
    assert list(out.obs.columns[-9:]) == ["scl_label", "scl_confidence", "scl_second_label", "scl_second_probability", "scl_novelty",
                                          "scl_novelty_p", "scl_genes_detected", "scl_novel", "scl_unassigned_reason"]
    assert out.obsm["X_scl"].shape == (70, 16) and out.obsm["scl_probabilities"].shape == (70, 7)
    np.testing.assert_allclose(out.obsm["scl_probabilities"].sum(1), 1, atol=1e-5)
    report = json.loads(out.uns["scl"]["report_json"])
    assert report["cells"] == 70 and report == json.loads((tmp_path / "r.json").read_text())

    trained = load_run(run_dir)
    with ExpressionSource(str(val), trained.model.gene_order) as src:
        x = np.vstack([b for _, b in src.blocks()])
    with torch.no_grad():
        torch_labels = trained.head(trained.model.encoder(torch.from_numpy(x)), torch.from_numpy(x)).argmax(1).numpy()
    assert list(out.obs["scl_label"]) == [trained.classes[i] for i in torch_labels]
    assert (out.obs["scl_label"] != out.obs["scl_second_label"]).all()
    assert (out.obs["scl_confidence"] >= out.obs["scl_second_probability"]).all()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_gives_the_same_calls(layout, exported, pbmc_small, tmp_path):
    LAYOUTS["csr_float32"](pbmc_small).write_h5ad(tmp_path / "ref.h5ad")
    LAYOUTS[layout](pbmc_small).write_h5ad(tmp_path / "in.h5ad")
    annotate(tmp_path / "ref.h5ad", "--model", exported, "--output", tmp_path / "ref.csv")
    annotate(tmp_path / "in.h5ad", "--model", exported, "--output", tmp_path / "out.csv")
    ref, out = pd.read_csv(tmp_path / "ref.csv"), pd.read_csv(tmp_path / "out.csv")
    assert list(out["label"]) == list(ref["label"])
    np.testing.assert_allclose(out["confidence"], ref["confidence"], atol=1e-4)


def test_real_files_from_the_command_line(exported, pbmc_path, brain_path, csv_path, tmp_path):
    code, stdout, stderr = run("scl-annotate", pbmc_path, brain_path, csv_path, "--model", exported, "--output-dir", tmp_path, "--format", "csv")
    assert code == 0, stderr
    assert "2,800 cells" in stdout and "466 cells" in stdout and "559 cells" in stdout and "cells/s on CPUExecutionProvider" in stdout
    for name, n in (("pbmc_sorted_dev", 2800), ("darmanis_brain_466", 466), ("celltypist_sample_559cells", 559)):
        table = pd.read_csv(tmp_path / f"{name}.scl.csv")
        assert len(table) == n and table["cell_id"].is_unique


def test_csv_input_to_h5ad_output_and_min_confidence(exported, csv_path, tmp_path):
    annotate(csv_path, "--model", exported, "--output", tmp_path / "c.h5ad", "--min-confidence", "0.9")
    out = ad.read_h5ad(tmp_path / "c.h5ad")
    assert out.n_obs == 559 and out.obs_names[0] == "Cell_1" and out.n_vars == 0
    low = out.obs["scl_confidence"] < 0.9
    assert (out.obs["scl_label"][low] == "unassigned").all() and (out.obs["scl_label"][~low] != "unassigned").all()


def test_collections_and_shards(exported, small_data, tmp_path):
    for i in range(4):
        shutil.copy(small_data / "val.h5ad", tmp_path / f"part{i}.h5ad")
    annotate(str(tmp_path / "part*.h5ad"), "--model", exported, "--output-dir", tmp_path / "out", "--shard", "1/2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part1.scl.h5ad", "part3.scl.h5ad"]


def test_bad_models_and_outputs(exported, small_data, tmp_path):
    val = small_data / "val.h5ad"
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model" * 100)
    bare = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                                         [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                                         [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(bare, tmp_path / "bare.onnx")
    few = ad.read_h5ad(val)[:, :500].copy()
    few.write_h5ad(tmp_path / "few.h5ad")
    (tmp_path / "a_dir.csv").mkdir()
    cases = [
        (["--model", tmp_path / "junk.onnx", "--output", tmp_path / "o.csv"], "not a loadable ONNX model"),
        (["--model", tmp_path / "bare.onnx", "--output", tmp_path / "o.csv"], "without scl metadata"),
        (["--model", tmp_path / "missing.onnx"], "no such model file"),
        (["--model", exported, "--output", val], "would replace the input"),
        (["--model", exported, "--output", tmp_path / "nowhere" / "o.csv"], "the folder for o.csv does not exist"),
        (["--model", exported, "--output", tmp_path / "o.csv", "--report", tmp_path / "nowhere" / "r.json"], "the folder for r.json does not exist"),
        (["--model", exported, "--output", tmp_path / "o.csv", "--csc-memory-limit", "-1"], "give a positive number of GiB"),
        (["--model", exported, "--output", tmp_path / "o.csv", "--csc-memory-limit", "nan"], "give a positive number of GiB"),
        (["--model", exported, "--output", tmp_path / "o.csv", "--batch-size", "0"], "batch_size 0: give a whole number, 1 or more"),
        (["--model", exported, "--output", tmp_path / "o.csv", "--min-confidence", "2"], "min_confidence 2.0: give a number in [0, 1], such as 0.0 (the default)"),
        (["--model", exported, "--output", tmp_path / "o.csv", "--min-confidence", "nan"], "min_confidence nan: give a number in [0, 1]"),
        (["--model", exported, "--output", tmp_path / "o.txt"], "must end in .csv or .h5ad"),
        (["--model", exported, "--shard", "2/2"], "--shard '2/2'"),
    ]
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        cases.append((["--model", exported, "--device", "cuda"], "no CUDA provider"))
    for args, words in cases:
        code, _, stderr = run("scl-annotate", val, *args, "--quiet")
        assert code == 1 and words in stderr and stderr.startswith("Error:") and len(stderr.strip().splitlines()) == 1, stderr
        assert "(see " not in stderr or "(see --" in stderr  # the CLI spells settings as its flags
    code, _, stderr = run("scl-annotate", tmp_path / "few.h5ad", "--model", exported, "--output", tmp_path / "f.csv")
    assert code == 1 and "only" in stderr and "genes are in the input" in stderr
    assert not (tmp_path / "f.csv").exists() and not (tmp_path / "o.csv").exists()


def test_a_failure_midway_leaves_nothing_behind(exported, pbmc_small, tmp_path):
    bad = pbmc_small.copy()
    bad.X = bad.X.tocsr()
    bad.X.data[bad.X.indptr[100] + 1] = np.nan  # in the second block of 64 cells
    bad.write_h5ad(tmp_path / "bad.h5ad")
    (tmp_path / "out").mkdir()
    code, _, stderr = run("scl-annotate", tmp_path / "bad.h5ad", "--model", exported, "--output", tmp_path / "out" / "o.h5ad", "--batch-size", "64")
    assert code == 1 and "NaN" in stderr and f"cell {bad.obs_names[100]!r} holds NaN" in stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_cells_of_types_the_model_never_saw_are_counted_and_unassigned_on_request(exported, run_dir, small_data, tmp_path):
    """The model knows 7 PBMC types. Brain cells still get PBMC labels, but their novelty p-values among the
    calibration cells are small: flagged novel, and unassigned on request, as scl-train measured."""
    shares = json.loads((run_dir / "metrics.json").read_text())["calibration"]["novel_share"]
    assert shares["validation"]["0.1"] < 0.25 and shares["forgetting_data"]["0.1"] > 0.9
    brain, val = small_data / "brain.h5ad", small_data / "val.h5ad"
    reports = {}
    for name, path, flags in (("counted", brain, ["--alpha", "0.1"]), ("auto", brain, ["--alpha", "0.1", "--max-novelty", "auto"]),
                              ("val", val, ["--alpha", "0.1", "--max-novelty", "auto"]), ("loose", brain, ["--max-novelty", "2"]),
                              ("default", brain, [])):
        annotate(path, "--model", exported, "--output", tmp_path / f"{name}.csv", "--report", tmp_path / f"{name}.json", *flags)
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    counted, auto = reports["counted"], reports["auto"]
    assert counted["novelty"]["novel_cells"] > 0.9 * counted["cells"] and counted["novelty"]["novel_cells"] == auto["novelty"]["novel_cells"]
    calls = pd.read_csv(tmp_path / "auto.csv", keep_default_na=False)
    assert list(calls["novel"]) == list(calls["novelty_p"] <= 0.1)
    assert list(calls["label"] == "unassigned") == list(calls["novel"] | (calls["set_size"] == 0))  # novel, or an empty set
    assert list(pd.read_csv(tmp_path / "counted.csv", keep_default_na=False)["label"] == "unassigned") == list(calls["set_size"] == 0)
    assert reports["val"]["labels"].get("unassigned", 0) < 0.3 * reports["val"]["cells"]
    assert reports["loose"]["novelty"]["novel_cells"] == 0 and "unassigned" not in reports["loose"]["labels"]
    # 42 calibration cells: no p-value reaches the default 0.01, and the report says so rather than a reassuring 0
    assert reports["default"]["novelty"]["novel_cells"] == 0 and "only 42 calibration cells" in reports["default"]["novelty"]["rule"]


def metadata_without(model, path, drop=(), add=None):
    """The model as an earlier scl exported it: some metadata keys absent (content digest too), others added."""
    older = onnx.load(str(model))
    kept = [p for p in older.metadata_props if p.key not in (*drop, "scl.content_sha256", "scl.format_version")]
    del older.metadata_props[:]
    older.metadata_props.extend(kept)
    older.metadata_props.add(key="scl.format_version", value="1")  # format 1: digests were not yet always written
    for key, value in (add or {}).items():
        older.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(older, str(path))
    return path


def test_max_novelty_errors_and_models_exported_before(exported, small_data, tmp_path):
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--output", tmp_path / "x.csv", "--max-novelty", "far")
    assert code != 0 and "max_novelty 'far'" in stderr and "(see --max-novelty)" in stderr and "Traceback" not in stderr
    for bad in ("0", "1", "-0.1", "nan"):
        code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--output", tmp_path / "x.csv", "--alpha", bad)
        assert code != 0 and "between 0 and 1" in stderr and "(see --alpha)" in stderr and not (tmp_path / "x.csv").exists()
    # exported before calibration: per-class novelty limits, no calibration cells
    limits = [0.05] * 7
    before_calibration = metadata_without(exported, tmp_path / "limits.onnx", ("scl.calibration",),
                                          {"scl.novelty_limits": {"values": limits, "quantile": 0.99, "from": "training and held-out cells"}})
    annotate(small_data / "val.h5ad", "--model", before_calibration, "--output", tmp_path / "l.csv", "--max-novelty", "auto")
    calls = pd.read_csv(tmp_path / "l.csv", keep_default_na=False)
    assert "novelty_p" not in calls and "prediction_set" not in calls
    assert list(calls["novel"]) == list(calls["novelty"] > 0.05) and list(calls["label"] == "unassigned") == list(calls["novel"])
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", before_calibration, "--output", tmp_path / "x.csv", "--alpha", "0.05")
    assert code != 0 and "carries no calibration cells" in stderr and "Traceback" not in stderr and not (tmp_path / "x.csv").exists()
    assert stderr.strip().splitlines()[-1].startswith("Error:")  # after the one-line note that the model predates content digests
    # calibration metadata that does not fit the model (a hand-edited file: no content digest to catch it)
    bad = metadata_without(exported, tmp_path / "bad.onnx", ("scl.calibration",),
                           {"scl.calibration": {"temperature": 1.0, "class_scores": [[0.1]], "class_distances": [[0.1]]}})
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", bad, "--output", tmp_path / "x.csv")
    assert code != 0 and "scl.calibration does not hold calibration scores and distances for each of the 7 classes" in stderr
    # exported before novelty limits too
    older = metadata_without(exported, tmp_path / "older.onnx", ("scl.calibration",))
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", older, "--output", tmp_path / "x.csv", "--max-novelty", "auto")
    assert code != 0 and "carries no novelty limits" in stderr and not (tmp_path / "x.csv").exists()
    annotate(small_data / "val.h5ad", "--model", older, "--output", tmp_path / "x.csv", "--report", tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text())["novelty"] == {"rule": None, "novel_cells": None, "unassigned_if_novel": False}


def test_input_is_never_modified(pbmc_path, exported, tmp_path):
    copy = shutil.copy(pbmc_path, tmp_path / "in.h5ad")
    before = open(copy, "rb").read()
    os.chmod(copy, 0o644)  # writable: a reader that wrote would be able to
    code, _, stderr = run("scl-annotate", copy, "--model", exported, "--output", tmp_path / "out.h5ad", "--quiet")
    assert code == 0, stderr
    assert open(copy, "rb").read() == before and ad.read_h5ad(tmp_path / "out.h5ad").n_obs == 2800
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.h5ad").stat().st_mode & 0o777 == 0o666 & ~umask  # the user's usual mode, not mkstemp's 0600


def test_novelty_equals_an_independent_computation_and_scl_trains_count(exported, run_dir, small_data, tmp_path):
    """scl_novelty and scl_novelty_p recomputed from the embedding, the model's unit centroids and its calibration
    distances (each cell against the calibration cells predicted as its label, or all of them where those are too
    few for alpha); the novel share on the validation cells is the one scl-train recorded."""
    from scl.runtime import model_metadata

    val = small_data / "val.h5ad"
    annotate(val, "--model", exported, "--output", tmp_path / "t.h5ad", "--probabilities", "--alpha", "0.1")
    out = ad.read_h5ad(tmp_path / "t.h5ad")
    meta = model_metadata.decode({p.key: p.value for p in onnx.load(str(exported)).metadata_props}, "model")
    centroids = np.asarray(meta["centroids"], dtype=np.float64)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    label = out.obsm["scl_probabilities"].argmax(1)
    distance = 1 - np.sum(out.obsm["X_scl"] * centroids[label], axis=1)
    np.testing.assert_allclose(out.obs["scl_novelty"], distance, atol=1e-5)
    groups = [np.asarray(d) for d in meta["calibration"]["class_distances"]]
    everyone = np.concatenate(groups)
    for d, k, p in zip(out.obs["scl_novelty"], label, out.obs["scl_novelty_p"]):
        reference = groups[k] if (len(groups[k]) + 1) * 0.1 >= 1 else everyone
        assert p == pytest.approx((1 + np.sum(reference >= d)) / (len(reference) + 1), abs=1e-6)
    assert list(out.obs["scl_novel"]) == list(out.obs["scl_novelty_p"] <= 0.1)
    recorded = json.loads((run_dir / "metrics.json").read_text())["calibration"]["novel_share"]["validation"]["0.1"]
    assert round(out.obs["scl_novel"].mean(), 4) == recorded


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3.9 MB tmpfs: room for a copy of the PBMC file (3.8 MB) but not for its annotations."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3900k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(exported, pbmc_path, tiny_disk, tmp_path):
    (tiny_disk / "out.csv").write_text("an earlier output\n")
    for output in ("out.h5ad", "out.csv"):
        if output == "out.csv":  # a CSV of these cells takes ~0.5 MB: leave less than that
            (tiny_disk / "filler").write_bytes(b"0" * (shutil.disk_usage(tiny_disk).free - 200_000))
        code, _, stderr = run("scl-annotate", pbmc_path, "--model", exported, "--output", tiny_disk / output, "--probabilities", "--quiet")
        assert code == 1 and stderr.startswith("Error:") and "the disk is full" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "out.csv"] and (tiny_disk / "out.csv").read_text() == "an earlier output\n"


def test_the_disk_filling_during_the_run_stops_before_the_writer_fails(exported, small_data, tmp_path, monkeypatch):
    """Another program takes the space mid-run: free space is checked before every block (patched here)."""
    import shutil as sh

    from click.testing import CliRunner

    from scl.runtime.annotate_cli import main

    real, calls = sh.disk_usage, []

    def shrinking(path):
        calls.append(path)
        usage = real(path)
        return usage._replace(free=usage.free if len(calls) < 3 else 1000)  # the check before the run passes, then the disk fills

    monkeypatch.setattr("scl.runtime.file_driver.shutil.disk_usage", shrinking)
    result = CliRunner().invoke(main, [str(small_data / "val.h5ad"), "--model", str(exported), "--output", str(tmp_path / "o.h5ad"),
                                       "--batch-size", "16", "--threads", "1", "--quiet"])
    assert result.exit_code == 1 and "the disk is full (0.0 MB free" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def big_input(pbmc_path, tmp_path):
    big = ad.read_h5ad(pbmc_path)
    big = ad.concat([big] * 4)
    big.obs_names_make_unique()
    big.write_h5ad(tmp_path / "big.h5ad")
    return tmp_path / "big.h5ad"


def run_until_it_writes_cells(args, folder, source):
    """Start scl-annotate and return once it is writing cells: its temporary output holds the whole copied input
    (an .h5ad output starts as a copy of its input), so the run is past start-up and copying, inside the block loop.
    A condition, not a clock: on a slow, shared machine start-up alone can take many seconds."""
    import subprocess
    import time

    from conftest import BIN

    process = subprocess.Popen([str(BIN / "scl-annotate"), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    size, deadline = os.path.getsize(source), time.time() + 600  # the deadline only stops a hung run from hanging the suite

    def writing() -> bool:
        return any(".scl-tmp-" in p and os.path.getsize(folder / p) > size for p in os.listdir(folder) if (folder / p).exists())

    while process.poll() is None and time.time() < deadline:
        try:
            if writing():
                break
        except FileNotFoundError:  # a temporary file removed between listing and measuring
            pass
        time.sleep(0.005)
    return process


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_killed_run_removes_its_temporary_file(sig, exported, pbmc_path, tmp_path):
    import signal

    source = big_input(pbmc_path, tmp_path)
    (tmp_path / "out").mkdir()
    process = run_until_it_writes_cells([source, "--model", exported, "--output", tmp_path / "out" / "o.h5ad",
                                         "--batch-size", "8", "--threads", "1", "--quiet"], tmp_path / "out", source)
    assert process.poll() is None, "the run ended before it could be signalled"
    process.send_signal(getattr(signal, sig))
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 128 + getattr(signal, sig) and "Traceback" not in stderr, stderr
    assert os.listdir(tmp_path / "out") == []


def test_the_next_run_removes_what_a_sigkilled_run_left(exported, pbmc_path, small_data, tmp_path):
    import signal

    source = big_input(pbmc_path, tmp_path)
    (tmp_path / "out").mkdir()
    process = run_until_it_writes_cells([source, "--model", exported, "--output", tmp_path / "out" / "o.h5ad",
                                         "--batch-size", "8", "--threads", "1", "--quiet"], tmp_path / "out", source)
    assert process.poll() is None, "the run ended before it could be signalled"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=600)
    left = os.listdir(tmp_path / "out")
    assert len(left) == 1 and left[0].startswith(".o.h5ad.scl-tmp-")
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--output", tmp_path / "out" / "o.h5ad", "--quiet")
    assert code == 0 and "removed 1 temporary file(s) left by a killed run" in stderr
    assert os.listdir(tmp_path / "out") == ["o.h5ad"]


def tampered(exported, tmp_path, kind: str):
    from onnx import numpy_helper

    model = onnx.load(str(exported))
    props = {p.key: p for p in model.metadata_props}
    if kind == "negated weights":
        t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    elif kind == "swapped classes":
        c = json.loads(props["scl.classes"].value)
        props["scl.classes"].value = json.dumps([c[1], c[0], *c[2:]])
    elif kind == "reversed gene order":
        props["scl.gene_order"].value = json.dumps(json.loads(props["scl.gene_order"].value)[::-1])
    elif kind == "one class short":
        props["scl.classes"].value = json.dumps(json.loads(props["scl.classes"].value)[:-1])
    elif kind == "gene order off by one":
        props["scl.gene_order"].value = json.dumps(json.loads(props["scl.gene_order"].value)[1:])
    elif kind == "invalid JSON":
        props["scl.centroids"].value = "[[0.1, 0.2"
    elif kind == "wrong type":
        props["scl.classes"].value = json.dumps("B")
    elif kind == "head scaled by its Gemm alpha":
        gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
        kept = [a for a in gemm.attribute if a.name != "alpha"]
        del gemm.attribute[:]
        gemm.attribute.extend([*kept, onnx.helper.make_attribute("alpha", 0.2)])
    elif kind == "Softmax made Hardmax":
        next(n for n in model.graph.node if n.op_type == "Softmax").op_type = "Hardmax"
    elif kind == "normalisation branches swapped":
        branch = next(n for n in model.graph.node if n.op_type == "If")
        then, other = (onnx.helper.get_attribute_value(a) for a in branch.attribute)
        del branch.attribute[:]
        branch.attribute.extend([onnx.helper.make_attribute("then_branch", other), onnx.helper.make_attribute("else_branch", then)])
    elif kind == "a Constant added in a subgraph":
        branch = next(n for n in model.graph.node if n.op_type == "If")
        branch.attribute[0].g.node.append(onnx.helper.make_node("Constant", [], ["extra"], value_float=1.0))
    elif kind == "digest deleted":
        kept = [p for p in model.metadata_props if p.key != "scl.content_sha256"]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    path = tmp_path / f"{kind.replace(' ', '_')}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind, words", [
    ("negated weights", "content digest mismatch"),
    ("swapped classes", "content digest mismatch"),
    ("reversed gene order", "content digest mismatch"),
    ("one class short", "scl.centroids is not 6 vectors of one width"),  # the graph-width checks: test_boundaries restamps
    ("gene order off by one", "content digest mismatch"),
    ("invalid JSON", "scl.centroids is not valid JSON"),
    ("wrong type", "scl.classes is not a list of names"),
    ("head scaled by its Gemm alpha", "content digest mismatch"),
    ("Softmax made Hardmax", "content digest mismatch"),
    ("normalisation branches swapped", "content digest mismatch"),
    ("a Constant added in a subgraph", "content digest mismatch"),
    ("digest deleted", "content digest (scl.content_sha256) is missing"),
])
def test_a_tampered_model_is_refused_in_one_line(kind, words, exported, small_data, tmp_path):
    model = tampered(exported, tmp_path, kind)
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", model, "--output", tmp_path / "o.csv", "--quiet")
    assert code == 1 and words in stderr and str(model) in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "o.csv").exists()


def test_a_model_loaded_and_saved_again_unchanged_still_verifies(exported, small_data, tmp_path):
    """The whole-model digest is over protobuf's serialisation: onnx.load + onnx.save of an untouched model gives the
    same bytes, so a user who re-saves a model is not refused."""
    onnx.save(onnx.load(str(exported)), str(tmp_path / "resaved.onnx"))
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", tmp_path / "resaved.onnx", "--output", tmp_path / "o.csv", "--quiet")
    assert code == 0 and "digest" not in stderr, stderr
