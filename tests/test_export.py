"""scl-export: one self-contained ONNX graph with metadata, validated against torch."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch

from scl.export.graph import AnnotationModel
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
    assert int8["variant"] == "int8" and 0 <= int8["label_agreement"] <= 1
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
    module = AnnotationModel(trained.model.encoder, trained.head).eval()
    rng = np.random.default_rng(1)
    for n in (1, 3, 257):
        counts = rng.poisson(0.5, size=(n, 28231)).astype(np.float32)
        probs, emb = session.run(None, {"counts": counts, "input_is_lognorm": np.zeros(1, np.float32)})
        with torch.no_grad():
            t_probs, t_emb = module(torch.from_numpy(counts), torch.zeros(1))
        assert probs.shape == (n, 7) and emb.shape == (n, 16)
        np.testing.assert_allclose(probs, t_probs.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_export_errors(run_dir, tmp_path):
    code, _, stderr = run("scl-export", tmp_path, "--out", tmp_path / "m.onnx")
    assert code == 1 and "metrics.json missing" in stderr
    code, _, stderr = run("scl-export", run_dir, "--out", tmp_path / "no" / "m.onnx")
    assert code == 1 and "no such directory" in stderr


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
