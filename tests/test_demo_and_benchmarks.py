"""The demo's fast variant and the benchmark suite's smoke run, so neither can rot."""

import json
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

from conftest import run

REPO = Path(__file__).resolve().parents[1]


def test_fast_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_summary.json").write_text("{}")  # an earlier demo
    code, _, stderr = run("scl-demo", "--out", out, "--fast")
    assert code == 1 and "holds an earlier demo; add --overwrite" in stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("not a demo")
    code, _, stderr = run("scl-demo", "--out", tmp_path / "mine", "--fast", "--overwrite")
    assert code == 1 and "not a demo's" in stderr and (tmp_path / "mine" / "thesis.tex").exists()
    code, stdout, stderr = run("scl-demo", "--out", out, "--fast", "--overwrite")
    assert code == 0, stderr
    for name in ("base_model/encoder.ckpt", "run/report.md", "run/confusion_lora.png", "model.onnx", "model.int8.onnx.validation.json"):
        assert (out / name).is_file(), name
    annotated = ad.read_h5ad(out / "pbmc_heldout.scl.h5ad")
    assert annotated.n_obs == 210 and set(annotated.obs["scl_label"]) <= set(annotated.obs["cell_type"].cat.categories)
    assert len(pd.read_csv(out / "unlabelled.scl.csv")) == 100
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["methods"]) == {"base+linear", "base+knn", "genes", "lora-embedding", "lora"}
    assert "done in" in stdout
    # every demo file the README and the --help examples name exists once the demo has run
    texts = [(REPO / "README.md").read_text()] + [run(c, "--help")[1] for c in ("scl-pretrain", "scl-train", "scl-export", "scl-annotate")]
    named = {m for text in texts for m in re.findall(r"(?:demo_out|train/demo_data)/[\w./-]+\.(?:h5ad|onnx|tsv|csv\.gz)", text)}
    assert len(named) >= 6
    for name in named:
        where = out / name.removeprefix("demo_out/") if name.startswith("demo_out/") else REPO / name
        assert where.is_file(), name


def test_benchmark_smoke_run(tmp_path, scimilarity_genes):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-smoke.json")).read_text())
    paths = result["throughput"]["paths"]
    assert set(paths) == {"scimilarity_align_lognorm_embed_torch", "scimilarity_get_embeddings_only_torch", "scl_merged_torch", "onnxruntime_fp32_bare",
                          "onnxruntime_int8_bare", "onnxruntime_fp32_bare_lognorm_input", "onnxruntime_int8_bare_lognorm_input",
                          "scl_annotate_fp32_end_to_end", "scl_annotate_int8_end_to_end"}
    assert all(r["cells_per_second"] > 0 for r in paths.values())
    ratios = result["throughput"]["end_to_end_vs_bare"]
    assert all(set(ratios[k]) == {"counts_input", "lognorm_input"} and min(ratios[k].values()) > 0 for k in ("fp32", "int8"))
    assert set(result["memory"]["peak_rss_mb"]) == {"200", "400"}
    variants = result["accuracy"]["variants"]
    assert set(variants) == {"torch_fp32", "onnxruntime_fp32", "onnxruntime_int8", "onnxruntime_fp16"}
    assert variants["onnxruntime_fp32"]["label_agreement_with_torch"] == 1.0 and variants["onnxruntime_fp32"]["max_abs_diff_embedding"] < 1e-4
    assert 0 < result["celltypist"]["macro_f1"] <= 1 and result["celltypist"]["cells_per_second"] > 0
    assert [v["cells"] for v in result["novelty"].values()] == [60, 466, 559]  # smoke: 300 PBMCs, a fifth held out
    assert all(0 <= v["share_novel"] <= 1 for v in result["novelty"].values())
    cost = result["training_cost"]["methods"]
    assert cost["lora"]["trainable_parameters"] < cost["full"]["trainable_parameters"]
    assert all(m["seconds_per_epoch"] > 0 and m["peak_rss_mb"] >= m["rss_before_training_mb"] * 0.5 for m in cost.values())
    table = next(tmp_path.glob("*-smoke.md")).read_text()
    assert "CellTypist 1.7.1" in table and "| full |" in table and "onnxruntime_int8" in table


def test_serve_load_smoke_run(tmp_path, scimilarity_genes):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-serve-smoke.json")).read_text())
    assert [(level["micro_batching"], level["clients"]) for level in result["levels"]] == [(True, 1), (True, 16), (False, 1), (False, 16)]
    # every request answered 200 (load() raises otherwise) and was timed
    assert all(level["requests"] == 20 and level["requests_per_second"] > 0 and level["p50_ms"] > 0 for level in result["levels"])
    hostile = result["unknown_genes"]
    assert hostile["status"] == 200 and hostile["distinct_genes"] == 40_001 and hostile["peak_rss_mb_after"] >= hostile["peak_rss_mb_before"] > 0
    slow = result["slow_clients"]  # 50 clients dripping a byte a second, --read-timeout 3: all cut near 3 s
    assert slow["still_open_at_end"] == 0 and 2.5 < slow["cut_after_s_min"] <= slow["cut_after_s_max"] < 6 and slow["healthz_status_after"] == [200]


def test_api_scale_smoke_run(tmp_path, scimilarity_genes):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "api_scale.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-api-smoke.json")).read_text())
    assert set(result["side_by_side"]["variants"]) == {"fp32", "int8"}
    assert all(v["api_in_memory_cells_per_second"] > 0 and v["scl_annotate_file_cells_per_second"] > 0 for v in result["side_by_side"]["variants"].values())
    assert [s["cells"] for s in result["scale"]] == [500, 1000]
    assert [s["clusters"] for s in result["scale"]] == [23, 32]  # ceil(sqrt(cells)): the automatic over-clustering ran
    assert "Annotator.annotate" in next(tmp_path.glob("*-api-smoke.md")).read_text()


def test_calibration_smoke_run(tmp_path, scimilarity_genes):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "calibration.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-calibration-smoke.json")).read_text())
    runs = list(result["pbmc"].values())
    assert [(p["holdout"], p["optimistic_warning"]) for p in runs] == [(0.2, False), (0.0, True)]  # only the base that saw every cell warns
    for p in runs:
        assert p["new_cells"]["cells"] == 210 and set(p["new_cells"]["alphas"]) == {"0.05", "0.1"}
        assert all(0 <= m["coverage"] <= 1 and m["mean_set_size"] >= 0 for m in p["new_cells"]["alphas"].values())
    assert set(result["pancreas"]) == {"baron -> segerstolpe", "segerstolpe -> baron"}
    assert all(0 < p["celltypist"]["macro_f1"] <= 1 and 0 < p["scl"]["macro_f1"] <= 1 for p in result["pancreas"].values())
    assert "Across technologies" in next(tmp_path.glob("*-calibration-smoke.md")).read_text()


def test_int8_layers_smoke_run(tmp_path, scimilarity_genes):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "int8_layers.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = json.loads(next(tmp_path.glob("*-int8-layers-smoke.json")).read_text())["runs"]
    variants = run["variants"]
    assert [v["int8_matrix_products"] for v in variants.values()] == [0, 5, 1]  # fp32; every layer (3 encoder, the head's 2); the gene-wide layer
    assert variants["fp32"]["label_agreement"] == 1.0 and all(0.5 < v["label_agreement"] <= 1 and v["speed_vs_fp32"] > 0 for v in variants.values())
    assert "gene layer (scl-export)" in next(tmp_path.glob("*-int8-layers-smoke.md")).read_text()


def test_recipe_smoke_run(tmp_path, scimilarity_genes):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "recipe.py"), "--smoke", "--settings", "pbmc_on_tissues",
                           "--grid", "lr=1e-3", "schedule=constant", "triplet_weight=1,0.1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-recipe-smoke.json")).read_text())
    assert set(result["settings"]) == {"pbmc_on_tissues"}
    for s in result["settings"].values():
        # the seed's recipe always runs; a swept FinetuneConfig field is named in the row and reaches the run
        assert list(s["lora"]) == ["seed", "lr 0.001, constant, max 20, triplet 1", "lr 0.001, constant, max 20, triplet 0.1"]
        assert [r["recipe"].get("triplet_weight") for r in s["lora"].values()] == [None, 1.0, 0.1]
        scores = [s["probe"]["macro_f1"], s["knn"]["macro_f1"], s["full_finetune"]["macro_f1"], *(r["macro_f1"] for r in s["lora"].values()),
                  s["celltypist"]["all_genes"]["macro_f1"], s["celltypist"]["300_features"]["macro_f1"]]
        assert all(0 <= f <= 1 for f in scores) and s["test_cells"] > 0
        assert all(r["head_max_row_norm"] > 0 for r in s["lora"].values())
        # the default head reads marker genes, the seed's the embedding alone; the same genes beside other encoders and alone
        assert [r["head_genes"] > 0 for r in s["lora"].values()] == [False, True, True]
        assert all(0 <= f <= 1 for f in (s["genes_only"]["macro_f1"], s["frozen_with_genes"]["macro_f1"], s["full_finetune"]["with_genes_macro_f1"]))
        assert s["genes_only"]["genes"] > 0
        assert s["celltypist"]["300_features"]["features"] < s["celltypist"]["all_genes"]["features"]  # feature selection ran
    assert all(0 < r["int8_label_agreement"] <= 1 for r in result["settings"]["pbmc_on_tissues"]["lora"].values())
    assert result["choice"]["chosen"] in result["settings"]["pbmc_on_tissues"]["lora"]
    assert "CellTypist, 300 features per class" in next(tmp_path.glob("*-recipe-smoke.md")).read_text()


def test_head_genes_smoke_run(tmp_path, scimilarity_genes):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "head_genes.py"), "--smoke", "--settings", "seg_to_baron", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-head-genes-smoke.json")).read_text())
    (s,) = result["settings"].values()
    assert len(s["embedding_only"]) == 6 and all(0 <= f <= 1 for f in s["embedding_only"].values())
    for feature in ("fine-tuned embedding + genes", "genes only", "frozen embedding + genes"):
        for per_class, scores in s["macro_f1"][feature].items():
            assert len(scores) == 6 and all(0 <= f <= 1 for f in scores.values())
            assert s["validation_choice"][feature][per_class]["macro_f1"] in scores.values()
    assert [v["genes"] for v in s["selection"].values()] == sorted(v["genes"] for v in s["selection"].values())  # more per class, more genes
    assert result["choice"]["genes_per_class"] in (50, 100, 300) and "Default chosen" in next(tmp_path.glob("*-head-genes-smoke.md")).read_text()


def test_probe_range_smoke_run(tmp_path, scimilarity_genes):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "probe_range.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-probe-range-smoke.json")).read_text())
    for s in result["settings"].values():
        narrow, wide = s["ranges"].values()
        assert 1e-3 <= narrow["C"] <= 10 and 1e-3 <= wide["C"] <= 1000 and all(0 <= v["macro_f1"] <= 1 for v in (narrow, wide))
    assert "C chosen" in next(tmp_path.glob("*-probe-range-smoke.md")).read_text()


def test_pancreas_genes_run(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pancreas_genes.py"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-pancreas-genes.json")).read_text())
    assert result["genes"]["baron"] == result["genes"]["seg"] == 2000 and 0 < result["genes"]["shared"] < 2000
    assert set(result["directions"]) == {"baron_to_seg", "seg_to_baron"}
    assert all(0 <= v <= 1 for d in result["directions"].values() for v in d.values()) and result["embedding"] is None


def test_ann_libraries_smoke_run(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ann_libraries.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*-ann-smoke.json")).read_text())
    (size,) = result["sizes"]
    (hnsw,) = size["libraries"]
    assert size["cells"] == 2000 and hnsw["library"] == "hnswlib" and [s["ef"] for s in hnsw["searches"]] == [64, 128, 256]
    assert all(0.9 <= s["recall_at_50"] <= 1 for s in hnsw["searches"]) and size["exact_numpy"]["query_cells_per_second"] > 0
    assert "recall@50" in next(tmp_path.glob("*-ann-smoke.md")).read_text()


def test_reference_accuracy_smoke_run(tmp_path, scimilarity_genes):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reference_accuracy.py"), "--smoke", "--settings", "seg_to_baron",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(next(tmp_path.glob("*-reference-smoke.json")).read_text())["settings"].values()
    scores = [v for k, v in row.items() if k.startswith(("head", "neighbours"))]
    assert len(scores) == 16 and all(v is None or 0 <= v <= 1 for v in scores) and row["test_cells"] > 0  # 14 scores, 2 accuracies
    assert 0.9 <= row["model_hnsw_recall_at_50"] <= 1 and 0.9 <= row["base_hnsw_recall_at_50"] <= 1
    assert "head + neighbours" in next(tmp_path.glob("*-reference-smoke.md")).read_text()


def test_reference_speed_smoke_run(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reference_speed.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*-reference-speed-smoke.json")).read_text())
    assert [r["index"]["kind"] for r in result["references"].values()] == ["exact", "hnsw"]
    assert list(result["annotate"]) == ["head", "head + reference of 3,000 cells", "head + reference of 12,000 cells"]
    assert all(r["cells_per_second"] > 0 and r["peak_rss_mb"] > 0 for r in result["annotate"].values())
    assert "ratio to the head alone" in next(tmp_path.glob("*-reference-speed-smoke.md")).read_text()


def test_dask_scale_smoke_run(tmp_path):
    pytest.importorskip("distributed")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dask_scale.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*-dask-smoke.json")).read_text())
    assert list(result["annotate"]) == ["plain scl-annotate", "--dask local:2", "--dask local:1"]
    assert all(r["cells_per_second"] > 0 for r in result["annotate"].values())
    assert [m["cells"] for m in result["memory"]] == [4000, 8000] and all(len(m["worker_peak_rss_mb"]) == 2 for m in result["memory"])
    assert "Projection for 10^8 cells" in next(tmp_path.glob("*-dask-smoke.md")).read_text()


def test_train_processes_smoke_run(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_processes.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*-train-processes-smoke.json")).read_text())
    assert list(result["runs"]) == ["1 process (scl-train)", "2 processes (torchrun, gloo)"]
    assert all(r["cells_per_s"] > 0 and r["train_cells"] == 192 for r in result["runs"].values())
    assert result["runs"]["1 process (scl-train)"]["ratio_to_one"] == 1.0


def test_row_reads_smoke_run(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "row_reads.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*-row-reads-smoke.json")).read_text())
    assert len(result["orders"]) == 5 and all(o["cells_per_s"] > 0 for o in result["orders"].values())


def test_train_stream_smoke_run(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_stream.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(next(tmp_path.glob("*-train-stream-smoke.json")).read_text())["rows"]
    assert row["cells"] == 2000 and row["loader"]["cells_per_s"] > 0
    for run in (row["in memory"], row["streamed"]):
        assert run["cells_per_s"] > 0 and run["peak_rss_mb"] > 0 and run["train_cells"] == 2000 - 20 - 20  # 1% of each type calibrates, 1% of the rest validates


def test_voting_scale_smoke_run(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "voting_scale.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("*-voting-smoke.json")).read_text())
    (step,) = result["step"].values()
    assert list(step) == ["every cell", "a sample"] and all(0 < v["purity"] <= 1 and v["peak_rss_mb"] > 0 for v in step.values())
    (runs,) = result["annotate"].values()
    assert runs["--majority-voting"]["clusters"] == 55 and runs["without voting"]["clusters"] is None  # ceil(sqrt(3,000))
    assert all(v["peak_anonymous_mb"] > 0 for v in runs.values())
    assert "peak anonymous memory" in next(tmp_path.glob("*-voting-smoke.md")).read_text()
