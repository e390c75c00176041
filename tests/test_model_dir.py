"""SCimilarity's model directory: what scl writes loads in the real scimilarity package, and back."""

import json

import numpy as np
import pytest
import torch

from scl.runtime.errors import SclError
from scl.train.model_dir import FILES, SCimilarityModel, load_model_dir, save_model_dir
from scl.train.nn import Decoder, Encoder


@pytest.fixture(scope="module")
def small_model(scimilarity_genes):
    torch.manual_seed(0)
    hidden = [64, 48]
    enc, dec = Encoder(len(scimilarity_genes), 16, hidden), Decoder(len(scimilarity_genes), 16, hidden[::-1])
    for module in (enc, dec):  # non-trivial batch-norm statistics, so eval mode matters
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return SCimilarityModel(enc.eval(), dec.eval(), scimilarity_genes, ["B", "T cell, naive", "NK"])


def test_written_directory_loads_in_scimilarity_with_identical_embeddings(small_model, pbmc_path, tmp_path):
    from scimilarity import CellEmbedding

    from scl.runtime.expression import ExpressionSource

    save_model_dir(tmp_path, small_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    ce = CellEmbedding(model_path=str(tmp_path))
    assert ce.latent_dim == 16 and ce.int2label == {0: "B", 1: "T cell, naive", 2: "NK"}
    with ExpressionSource(str(pbmc_path), small_model.gene_order) as src:
        _, x = next(src.blocks())
    theirs = ce.get_embeddings(x)
    with torch.no_grad():
        ours = small_model.encoder(torch.from_numpy(x)).numpy()
        back = load_model_dir(tmp_path)
        reloaded = back.encoder(torch.from_numpy(x)).numpy()
    assert np.abs(theirs - ours).max() < 1e-6
    assert np.array_equal(ours, reloaded)
    assert back.hidden_dim == [64, 48] and back.latent_dim == 16 and back.labels == small_model.labels
    for name, param in small_model.decoder.state_dict().items():
        assert torch.equal(param, back.decoder.state_dict()[name])


@pytest.mark.parametrize("broken, words", [
    (lambda d: (d / "decoder.ckpt").unlink(), "decoder.ckpt missing"),
    (lambda d: (d / "gene_order.tsv").write_text("A\nB\n"), "gene_order.tsv: lists 2 genes but encoder.ckpt takes 28231"),
    (lambda d: (d / "gene_order.tsv").write_text("A\nA\n"), "gene_order.tsv: holds duplicate genes"),
    (lambda d: (d / "layer_sizes.json").write_text(json.dumps({"network.0.1.weight": [3, 3]})), "layer_sizes.json: does not match"),
    (lambda d: (d / "layer_sizes.json").write_text("{"), "layer_sizes.json: not the encoder"),
    (lambda d: (d / "encoder.ckpt").write_bytes(b"junk"), "encoder.ckpt: not a readable torch checkpoint"),
    (lambda d: torch.save({"state_dict": {"x": torch.zeros(1)}}, d / "decoder.ckpt"), "decoder.ckpt: does not fit"),
    (lambda d: (d / "label_ints.csv").write_text("a,b\n"), "label_ints.csv: expected a header"),
])
def test_missing_or_inconsistent_files_are_named(broken, words, small_model, tmp_path):
    save_model_dir(tmp_path, small_model)
    broken(tmp_path)
    with pytest.raises(SclError) as err:
        load_model_dir(tmp_path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_labels_with_commas_and_quotes_round_trip(small_model, tmp_path):
    import pandas as pd

    labels = ['B "memory", IgD-', "T cell, naive", 'say "hi"']
    model = SCimilarityModel(small_model.encoder, small_model.decoder, small_model.gene_order, labels)
    save_model_dir(tmp_path / "m", model)
    assert load_model_dir(tmp_path / "m").labels == labels
    # SCimilarity reads it with pandas, as it wrote it
    assert pd.read_csv(tmp_path / "m" / "label_ints.csv", index_col=0)["0"].tolist() == labels
    (tmp_path / "m" / "label_ints.csv").write_text(',0\n0,B "memory", IgD-\n1,NK\n')  # hand-written, unquoted
    with pytest.raises(SclError, match="is not 'int,label'"):
        load_model_dir(tmp_path / "m")
