"""Write the annotation model as a self-contained ONNX file with scl metadata; fp32 and dynamic int8."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from scl.runtime import integrity
from scl.runtime import model_metadata as meta
from scl.runtime.atomic import atomic_path

from .graph import AnnotationModel, EncoderModel


def weights_digest(model: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(init.name.encode())
        h.update(init.raw_data if init.raw_data else onnx.numpy_helper.to_array(init).tobytes())
    return h.hexdigest()


def save_with_metadata(model: onnx.ModelProto, values: dict, path: Path) -> None:
    """Stamp the metadata (with this file's own weight digest) and write atomically."""
    with atomic_path(path, suffix=".onnx") as tmp:
        save_unchecked(model, values, tmp)


def save_unchecked(model: onnx.ModelProto, values: dict, path) -> None:
    """Stamp the metadata and write to `path` as it is (scl-export writes a temporary file, validates, then renames)."""
    values = {**values, "weights_sha256": weights_digest(model)}
    del model.metadata_props[:]
    values[integrity.KEY] = integrity.digest_of(model.SerializeToString(), meta.parse(meta.encode(values), "model"))  # by its format's rule
    for key, value in meta.encode(values).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def export_fp32(module: AnnotationModel | EncoderModel, n_genes: int) -> onnx.ModelProto:
    counts = torch.rand(4, n_genes)
    flag = torch.zeros(1)
    cells = torch.export.Dim("cells", min=1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" lines
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        outputs = meta.OUTPUTS if isinstance(module(counts, flag), tuple) else meta.ENCODER_OUTPUTS  # an EncoderModel gives the embedding alone
        program = torch.onnx.export(
            module, (counts, flag), input_names=[meta.INPUT_COUNTS, meta.INPUT_IS_LOGNORM], output_names=list(outputs),
            dynamic_shapes=({0: cells}, None), dynamo=True, external_data=False, verbose=False,
        )
    return program.model_proto


def gene_layer_nodes(model: onnx.ModelProto) -> list[str]:
    """The matrix product over the gene axis (the encoder's first layer): about 96% of the weights and the work."""
    n_genes = next(i for i in model.graph.input if i.name == meta.INPUT_COUNTS).type.tensor_type.shape.dim[1].dim_value
    wide = {t.name for t in model.graph.initializer if n_genes in t.dims}
    names = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and wide & set(n.input)]
    if len(names) != 1:
        raise RuntimeError(f"expected one matrix product over the {n_genes} genes in the graph, found {len(names)}")
    return names + [names[0] + "_MatMul"]  # onnxruntime renames a Gemm it splits into MatMul + Add


def quantize_int8(fp32_path: Path) -> onnx.ModelProto:
    """onnxruntime's dynamic quantization of the gene-wide first layer: int8 weights, activations quantized per batch.

    The later layers stay float32. Quantized, they round their inputs to 8 bits per batch, the 128-d embedding fed to
    the head included: on an embedding as narrow as the full demo's (per-feature spread about 0.02) that rounding is
    comparable to the distance between neighbouring classes, and it changed 0-7.6% of the demo's labels over three
    seeds. Kept in float32 they cost 3.5 MB (34 vs 30.5 MB) and no speed: 2.2-2.4x fp32 either way
    (benchmarks/int8_layers.py).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process applies to static quantization
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(fp32_path), str(out), weight_type=QuantType.QInt8, nodes_to_quantize=gene_layer_nodes(onnx.load(str(fp32_path))))
        return onnx.load(str(out))


FP16_OPS = {"MatMul", "Gemm"}  # the matrix products carry the cost; everything else stays float32


def convert_fp16(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 matrix products for CUDA; inputs, outputs, normalisation (count totals exceed fp16's 65,504) and the
    rest of the graph stay float32. Uses onnxruntime's own converter."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep_fp32 = sorted({node.op_type for node in fp32.graph.node} - FP16_OPS)
    return convert_float_to_float16(fp32, keep_io_types=True, op_block_list=keep_fp32)


def random_counts(n_cells: int, n_genes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.poisson(0.3, size=(n_cells, n_genes)).astype(np.float32)
