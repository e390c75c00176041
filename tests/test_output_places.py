"""No output lands on an input, the model, the run it came from or another output (runtime/places.py); outputs
written over earlier scl outputs stay readable."""

import gzip
import hashlib
import os
import shutil

import anndata as ad
from conftest import run


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def refused(args, words):
    code, _, stderr = run(*args, "--quiet") if args[0] == "scl-annotate" else run(*args)
    assert code == 1 and words in stderr and stderr.startswith("Error:") and len(stderr.strip().splitlines()) == 1, stderr
    return stderr


def test_report_and_outputs_never_replace_inputs_the_model_or_each_other(exported, small_data, tmp_path):
    val = tmp_path / "val.h5ad"
    shutil.copy(small_data / "val.h5ad", val)
    os.symlink(val, tmp_path / "link.json")
    os.link(val, tmp_path / "hard.json")
    os.link(exported, tmp_path / "model_link.json")
    before = {p: digest(p) for p in (val, exported)}
    out = tmp_path / "o.csv"
    for report, what in [(val, "the input"), (out, "the output of"), (exported, "the model"), (tmp_path / "link.json", "the input"),
                         (tmp_path / "hard.json", "the input"), (tmp_path / "model_link.json", "the model")]:
        stderr = refused(["scl-annotate", val, "--model", exported, "--output", out, "--report", report], "would replace " + what)
        assert "(see --report" in stderr
    refused(["scl-annotate", val, "--model", exported, "--output", tmp_path / "hard.json.csv", "--report", tmp_path / "hard.json.csv"],
            "would replace the output of")
    os.symlink(val, tmp_path / "out_link.h5ad")
    refused(["scl-annotate", val, "--model", exported, "--output", tmp_path / "out_link.h5ad"], "would replace the input")
    refused(["scl-annotate", val, "--model", exported, "--output", exported.with_suffix(".csv"), "--report", exported], "the model")
    assert {p: digest(p) for p in (val, exported)} == before
    assert not out.exists()


def test_two_inputs_of_one_name_are_refused_before_any_work(exported, small_data, tmp_path):
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        shutil.copy(small_data / "val.h5ad", tmp_path / folder / "x.h5ad")
    stderr = refused(["scl-annotate", tmp_path / "d1" / "x.h5ad", tmp_path / "d2" / "x.h5ad", "--model", exported, "--output-dir", tmp_path / "out"],
                     "the output of")
    assert "d1/x.h5ad" in stderr and "d2/x.h5ad" in stderr and "(see --output-dir)" in stderr
    assert not any((tmp_path / "out").iterdir())
    ad.read_h5ad(small_data / "val.h5ad").to_df().to_csv(tmp_path / "y.csv")
    with open(tmp_path / "y.csv", "rb") as src, gzip.open(tmp_path / "y.csv.gz", "wb") as dst:
        dst.write(src.read())
    stderr = refused(["scl-annotate", tmp_path / "y.csv", tmp_path / "y.csv.gz", "--model", exported, "--output-dir", tmp_path / "out2"],
                     "y.scl.csv")
    assert "y.csv.gz" in stderr
    assert not any((tmp_path / "out2").iterdir())


def test_export_refuses_an_out_inside_the_run_or_not_onnx(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    head = digest(copy / "head.pt")
    refused(["scl-export", copy, "--out", copy / "head.pt"], "must end in .onnx")
    refused(["scl-export", copy, "--out", copy / "model.onnx"], "inside the run folder")
    refused(["scl-export", copy, "--out", copy / "model" / "m.onnx"], "inside the run folder")
    os.symlink(copy, tmp_path / "run_link")
    refused(["scl-export", copy, "--out", tmp_path / "run_link" / "m.onnx"], "inside the run folder")
    assert digest(copy / "head.pt") == head and not (copy / "model.onnx").exists()


def test_reannotating_an_scl_output_with_fewer_columns_writes_a_valid_h5ad(exported, small_data, tmp_path):
    first = tmp_path / "first.h5ad"
    code, _, stderr = run("scl-annotate", small_data / "val.h5ad", "--model", exported, "--output", first, "--alpha", "0.1",
                          "--majority-voting", "--quiet")
    assert code == 0, stderr
    columns = set(ad.read_h5ad(first).obs.columns)
    assert {"scl_prediction_set", "scl_set_size", "scl_majority_label"} <= columns
    second = tmp_path / "second.h5ad"
    code, _, stderr = run("scl-annotate", first, "--model", exported, "--output", second, "--quiet")
    assert code == 0, stderr
    again = ad.read_h5ad(second)  # anndata reads it back: no column-order entry without its column
    assert "scl_label" in again.obs and not {"scl_prediction_set", "scl_set_size", "scl_majority_label", "scl_cluster"} & set(again.obs)
    assert set(ad.read_h5ad(small_data / "val.h5ad").obs.columns) <= set(again.obs.columns)
