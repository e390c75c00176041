"""SCimilarity v1.1's model directory, read and written.

    encoder.ckpt      torch.save({"state_dict": Encoder.state_dict()})
    decoder.ckpt      torch.save({"state_dict": Decoder.state_dict()})
    layer_sizes.json  {state-dict key: shape} of the encoder; hidden sizes are inferred from it
    gene_order.tsv    one gene symbol per line, the encoder's input order
    label_ints.csv    pandas CSV, index = label int, column "0" = label name

What save_model_dir writes loads in scimilarity.CellEmbedding(model_path=...).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from scl.runtime.atomic import atomic_path
from scl.runtime.errors import SclError

from .nn import Decoder, Encoder

FILES = ("encoder.ckpt", "decoder.ckpt", "layer_sizes.json", "gene_order.tsv", "label_ints.csv")


@dataclass
class SCimilarityModel:
    encoder: Encoder
    decoder: Decoder
    gene_order: list[str]
    labels: list[str]

    @property
    def hidden_dim(self) -> list[int]:
        return [block[1].out_features for block in self.encoder.network[:-1]]

    @property
    def latent_dim(self) -> int:
        return self.encoder.network[-1].out_features


def read_gene_order(path) -> list[str]:
    """One gene symbol per line, as in SCimilarity's gene_order.tsv."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def sizes_from_layer_sizes(layer_sizes: dict) -> tuple[list[int], int]:
    """(hidden_dim, latent_dim) exactly as scimilarity.CellEmbedding infers them."""
    weights = [layer_sizes[k] for k in sorted(layer_sizes) if "weight" in k and len(layer_sizes[k]) > 1]
    return [shape[0] for shape in weights][:-1], weights[-1][0]


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_model_dir(path, model: SCimilarityModel) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, module in (("encoder.ckpt", model.encoder), ("decoder.ckpt", model.decoder)):
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        _atomic_write(path / name, lambda tmp, s=state: torch.save({"state_dict": s}, tmp))
    shapes = {k: list(v.shape) for k, v in model.encoder.state_dict().items()}
    _write_text(path / "layer_sizes.json", json.dumps(shapes, indent=1) + "\n")
    _write_text(path / "gene_order.tsv", "".join(f"{g}\n" for g in model.gene_order))
    _write_text(path / "label_ints.csv", _labels_csv(model.labels))
    return path


def _labels_csv(labels: list[str]) -> str:
    """SCimilarity's label_ints.csv (pandas' to_csv of an int -> label series): header ',0', then 'int,label' rows."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["", "0"])
    writer.writerows([i, label] for i, label in enumerate(labels))
    return text.getvalue()


def _load_state(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad file
        raise SclError(f"{path}: not a readable torch checkpoint ({type(err).__name__}); copy the file again.") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise SclError(f"{path}: expected torch.save({{'state_dict': ...}}) as SCimilarity writes it.")
    return ckpt["state_dict"]


def _read_labels(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0][-1:] != ["0"]:
        raise SclError(f"{path}: expected a header ',0' and rows 'int,label' as SCimilarity writes them.")
    body = [row for row in rows[1:] if row]
    bad = next((row for row in body if len(row) != 2 or not row[0].lstrip("-").isdigit()), None)
    if bad is not None:
        raise SclError(f"{path}: the row {','.join(bad)!r} is not 'int,label' (a label with a comma or quote must be quoted as csv does); write the file again.")
    return [row[1] for row in sorted(body, key=lambda r: int(r[0]))]


def load_model_dir(path) -> SCimilarityModel:
    path = Path(path)
    if not path.is_dir():
        raise SclError(f"{path}: not a directory; give a SCimilarity model directory (encoder.ckpt, gene_order.tsv, ...).")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise SclError(f"{path}: {', '.join(missing)} missing; a SCimilarity model directory holds {', '.join(FILES)}.")
    try:
        layer_sizes = json.loads((path / "layer_sizes.json").read_text())
        hidden_dim, latent_dim = sizes_from_layer_sizes(layer_sizes)
    except (ValueError, KeyError, IndexError, TypeError):
        raise SclError(f"{path / 'layer_sizes.json'}: not the encoder's {{key: shape}} JSON that SCimilarity writes.") from None
    gene_order = read_gene_order(path / "gene_order.tsv")
    if len(set(gene_order)) != len(gene_order):
        raise SclError(f"{path / 'gene_order.tsv'}: holds duplicate genes; each symbol must appear once.")

    enc_state = _load_state(path / "encoder.ckpt")
    shapes = {k: list(v.shape) for k, v in enc_state.items()}
    if shapes != layer_sizes:
        raise SclError(f"{path / 'layer_sizes.json'}: does not match the shapes in encoder.ckpt; write it again from the encoder.")
    n_inputs = shapes.get("network.0.1.weight", [0, 0])[1]
    if n_inputs != len(gene_order):
        raise SclError(f"{path / 'gene_order.tsv'}: lists {len(gene_order)} genes but encoder.ckpt takes {n_inputs} inputs.")
    encoder = Encoder(len(gene_order), latent_dim, hidden_dim)
    decoder = Decoder(len(gene_order), latent_dim, list(reversed(hidden_dim)))
    for name, module, state in (("encoder.ckpt", encoder, enc_state), ("decoder.ckpt", decoder, _load_state(path / "decoder.ckpt"))):
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            raise SclError(f"{path / name}: does not fit a {len(gene_order)} -> {hidden_dim} -> {latent_dim} network ({str(err).splitlines()[0]}).") from None
    return SCimilarityModel(encoder.eval(), decoder.eval(), gene_order, _read_labels(path / "label_ints.csv"))
