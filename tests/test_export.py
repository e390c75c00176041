"""scl-export: one self-contained ONNX graph with metadata, validated against torch."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import torch

from scl.export.graph import annotation_model
from scl.export.onnx_file import weights_digest
from scl.runtime import model_metadata
from scl.train.run_dir import load_run

from conftest import run


def test_fp32_and_int8_files_validate_against_torch(exported):
    fp32 = json.loads(exported.with_name("model.onnx.validation.json").read_text())
    int8 = json.loads(exported.with_name("model.int8.onnx.validation.json").read_text())
    assert fp32["passed"] and fp32["label_agreement"] == 1.0
    assert fp32["max_abs_diff_probabilities"] <= 1e-4 and fp32["max_abs_diff_embedding"] <= 1e-4
    assert fp32["sample"].endswith("val.h5ad") and fp32["cells"] == 70
    assert int8["variant"] == "int8" and int8["validated"]
    assert exported.with_name("model.int8.onnx").stat().st_size < exported.stat().st_size / 2
    assert not list(exported.parent.glob(".*"))  # no temporary files left


def test_metadata_is_complete_and_the_digest_is_the_files_own(exported, run_dir):
    model = onnx.load(str(exported))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)  # self-contained
    meta = model_metadata.decode({p.key: p.value for p in model.metadata_props}, str(exported))
    assert len(meta["gene_order"]) == 28231 and meta["gene_order"][0] == "A1BG"
    assert meta["classes"] == json.loads((run_dir / "classes.json").read_text())
    assert np.asarray(meta["centroids"]).shape == (7, 16)
    assert meta["normalization"] == {"target_sum": 1e4, "log1p": True, "aligned_first": True}
    card = meta["model_card"]
    assert len(card["training_data_sha256"]) == 64 and "lora" in card["validation_metrics"]
    assert meta["weights_sha256"] == weights_digest(model)


def test_graph_inputs_outputs_and_dynamic_batch(exported, run_dir):
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["counts", "input_is_lognorm"]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "embedding"]
    trained = load_run(run_dir)
    module = annotation_model(trained)
    temperature = json.loads((run_dir / "calibration.json").read_text())["temperature"]
    assert temperature != 1.0
    rng = np.random.default_rng(1)
    for n in (1, 3, 257):
        counts = rng.poisson(0.5, size=(n, 28231)).astype(np.float32)
        probs, emb = session.run(None, {"counts": counts, "input_is_lognorm": np.zeros(1, np.float32)})
        with torch.no_grad():
            t_probs, t_emb = module(torch.from_numpy(counts), torch.zeros(1))
        assert probs.shape == (n, 7) and emb.shape == (n, 16)
        np.testing.assert_allclose(probs, t_probs.numpy(), atol=1e-5)
        lognorm = torch.log1p(torch.from_numpy(counts) * 1e4 / torch.from_numpy(counts).sum(1, keepdim=True).clamp_min(1e-12))
        with torch.no_grad():  # calibrated: softmax(head(embedding, marker genes' log1p) / T), T from the run's calibration
            calibrated = torch.softmax(trained.head(torch.from_numpy(emb), lognorm) / temperature, dim=1).numpy()
        np.testing.assert_allclose(probs, calibrated, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_export_errors(run_dir, tmp_path):
    import os
    import shutil
    import subprocess

    from conftest import BIN

    (tmp_path / "empty").mkdir()
    code, _, stderr = run("scl-export", tmp_path / "empty", "--out", tmp_path / "m.onnx")
    assert code == 1 and "metrics.json missing" in stderr
    code, _, stderr = run("scl-export", run_dir, "--out", tmp_path / "no" / "m.onnx")
    assert code == 1 and "no such directory" in stderr
    code, _, stderr = run("scl-export", run_dir, "--out", tmp_path / "m.onnx", "--sample-cells", "-3")
    assert code == 2 and "--sample-cells" in stderr and not (tmp_path / "m.onnx").exists()
    broken = tmp_path / "broken_run"
    shutil.copytree(run_dir, broken)
    (broken / "head.pt").write_bytes(b"not a checkpoint")
    code, _, stderr = run("scl-export", broken, "--out", tmp_path / "m.onnx")
    assert code == 1 and "head.pt: not the head scl-train writes" in stderr and len(stderr.strip().splitlines()) == 1
    shutil.copy(run_dir / "head.pt", broken / "head.pt")
    (broken / "calibration.json").write_text('{"temperature": "warm"}')
    code, _, stderr = run("scl-export", broken, "--out", tmp_path / "m.onnx")
    assert code == 1 and "calibration.json: not the calibration scl-train writes" in stderr and len(stderr.strip().splitlines()) == 1
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "onnxruntime.py").write_text("raise ImportError('blocked', name='onnxruntime')\n")
    done = subprocess.run([BIN / "scl-export", run_dir, "--out", tmp_path / "m.onnx"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "block")})
    assert done.returncode == 1 and "scl-export needs onnxruntime: pip install 'scl[train,cpu]'" in done.stderr, done.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_fp16_variant_keeps_float32_io_and_is_validated_or_says_why(exported):
    fp16 = exported.with_name("model.fp16.onnx")
    model = onnx.load(str(fp16))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT] * 2
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert fp16.stat().st_size < 0.6 * exported.stat().st_size
    meta = model_metadata.decode({p.key: p.value for p in model.metadata_props}, str(fp16))
    assert meta["weights_sha256"] == weights_digest(model) and len(meta["gene_order"]) == 28231
    report = json.loads(fp16.with_name("model.fp16.onnx.validation.json").read_text())
    if report["validated"]:
        assert report["label_agreement"] >= 0.9 and report["max_abs_diff_embedding"] < 1e-2
    else:
        assert report["reason"]


def test_an_fp32_graph_that_disagrees_with_torch_is_refused_and_replaces_nothing(run_dir, exported, tmp_path, monkeypatch):
    """The graph written is made from a slightly different head (probabilities move by ~1e-2: far beyond 1e-4,
    well inside a loosened 1e-1): scl-export must refuse it and leave the model already at --out untouched."""
    import copy

    from click.testing import CliRunner

    import scl.export.onnx_file as onnx_file
    from scl.export.cli import main as export_main

    real = onnx_file.export_fp32

    def perturbed(module, n_genes):
        other = copy.deepcopy(module)
        with torch.no_grad():
            other.head.weight.add_(0.05 * torch.randn(other.head.weight.shape, generator=torch.Generator().manual_seed(0)))
        return real(other, n_genes)

    out = tmp_path / "model.onnx"
    out.write_bytes(exported.read_bytes())
    before = out.read_bytes()
    monkeypatch.setattr(onnx_file, "export_fp32", perturbed)
    result = CliRunner().invoke(export_main, [str(run_dir), "--out", str(out), "--sample-cells", "70"])
    assert result.exit_code == 1 and "disagrees with torch beyond 1e-4" in result.output, result.output
    diff = float(re.search(r"probabilities ([0-9.e+-]+)", result.output).group(1))
    assert 1e-4 < diff < 1e-1  # the perturbation is one a loosened tolerance would let through
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_an_fp32_graph_whose_embedding_alone_is_off_is_refused(run_dir, tmp_path, monkeypatch):
    """The graph's embedding 2% off unit length, its probabilities exact: the embedding half of the fp32 rule must refuse it."""
    from click.testing import CliRunner

    import scl.export.onnx_file as onnx_file
    from scl.export.cli import main as export_main

    real = onnx_file.export_fp32

    class Stretched(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, counts, input_is_lognorm):
            probabilities, embedding = self.inner(counts, input_is_lognorm)
            return probabilities, embedding * 1.02

    monkeypatch.setattr(onnx_file, "export_fp32", lambda module, n_genes: real(Stretched(module), n_genes))
    result = CliRunner().invoke(export_main, [str(run_dir), "--out", str(tmp_path / "m.onnx"), "--sample-cells", "40"])
    assert result.exit_code == 1 and "disagrees with torch beyond 1e-4" in result.output, result.output
    assert float(re.search(r"probabilities ([0-9.e+-]+)", result.output).group(1)) <= 1e-4
    assert float(re.search(r"embedding ([0-9.e+-]+)", result.output).group(1)) > 1e-3
    assert list(tmp_path.iterdir()) == []


def test_int8_warns_exactly_when_it_changes_too_many_labels(exported):
    from scl.export.validate import INT8_AGREEMENT_WARNING

    report = json.loads(exported.with_name("model.int8.onnx.validation.json").read_text())
    stderr = (exported.parent / "stderr.txt").read_text()
    warned = report["label_agreement"] < INT8_AGREEMENT_WARNING
    assert ("warning" in report) == warned and ("warning: model.int8.onnx: the int8 model changes" in stderr) == warned
    assert report["validated"] and 0.5 < report["label_agreement"]  # measured 0.93-1.0 on this small model


def test_int8_quantizes_only_the_gene_wide_layer(exported):
    """The layers after it stay float32: rounding the embedding to 8 bits before the head moved 0-7.6% of the full
    demo's labels (benchmarks/int8_layers.py); the first layer holds nearly all the weights and the work."""
    int8 = onnx.load(str(exported.with_name("model.int8.onnx")))
    weights = {t.name: list(t.dims) for t in int8.graph.initializer}
    quantized = [n for n in int8.graph.node if n.op_type == "MatMulInteger"]
    assert len(quantized) == 1 and 28231 in weights[quantized[0].input[1]]
    float_products = [n for n in int8.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(float_products) >= 2  # the later encoder layers and the head
    assert all(28231 not in weights.get(n.input[1], []) for n in float_products)


def test_the_int8_warning_is_printed_and_recorded_when_agreement_is_below_the_threshold(run_dir, tmp_path, monkeypatch):
    """With the threshold above any agreement (1.01) the warning must appear, on stderr and in the report."""
    from click.testing import CliRunner

    import scl.export.validate as validate
    from scl.export.cli import main as export_main

    monkeypatch.setattr(validate, "INT8_AGREEMENT_WARNING", 1.01)
    result = CliRunner().invoke(export_main, [str(run_dir), "--out", str(tmp_path / "m.onnx"), "--quantize", "int8", "--sample-cells", "70"])
    assert result.exit_code == 0, result.output
    assert "warning: m.int8.onnx: the int8 model changes" in result.stderr
    report = json.loads((tmp_path / "m.int8.onnx.validation.json").read_text())
    assert report["warning"].startswith("the int8 model changes") and "warning" not in json.loads((tmp_path / "m.onnx.validation.json").read_text())
