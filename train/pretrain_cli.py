"""scl-pretrain: build a base model in SCimilarity's format from labelled .h5ad files."""

from __future__ import annotations

import click

from scl.runtime.cli_errors import reports_input_errors
from scl.runtime.errors import SclError

from .config import PretrainConfig


def _ints(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise SclError(f"--hidden {text!r}: give layer sizes as whole numbers of 1 or more, separated by commas, such as 1024,1024.")
    return sizes


@click.command(
    epilog="""Example (the demo's base: brain plus PBMC cells in SCimilarity's 28,231-gene order; run from the
checkout after `make demo`; --triplet-weight 0.5 because a thousand cells are few, see the README):

\b
  scl-pretrain --data demo_out/data/pbmc_train.h5ad --data train/demo_data/brain_demo.h5ad \\
      --label-key cell_type --gene-order train/demo_data/scimilarity_gene_order.tsv \\
      --triplet-weight 0.5 --epochs 15 --out my_base

The directory it writes (encoder.ckpt, decoder.ckpt, layer_sizes.json, gene_order.tsv,
label_ints.csv) loads in scimilarity.CellEmbedding and in scl-train --base-model. A fifth of each
file's cells (--holdout) is kept out of training and named in pretrain.json: scl-train on the same
file calibrates on exactly those, the only cells no stage has seen.

Several processes (DistributedDataParallel: gloo on CPUs, NCCL with one process per GPU); --stream
reads the cells from the files a window at a time instead of holding them in memory:

\b
  torchrun --standalone --nproc-per-node 2 -m scl.train.pretrain_cli --data a.h5ad --data b.h5ad --out my_base --stream"""
)
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False), help="Labelled .h5ad file; repeat for several.")
@click.option("--label-key", default="cell_type", show_default=True, help="obs column with the cell-type labels.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--gene-order", type=click.Path(exists=True, dir_okay=False), help="gene_order.tsv to align to; default: the union of the files' genes.")
@click.option("--hidden", default="1024,1024", show_default=True, help="Hidden layer sizes.")
@click.option("--latent", default=128, type=click.IntRange(min=1), show_default=True, help="Embedding size.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--lr", default=5e-3, show_default=True, help="AdamW learning rate (SCimilarity's default).")
@click.option("--triplet-weight", default=0.001, show_default=True, help="loss = w * triplet + (1 - w) * MSE.")
@click.option("--holdout", default=0.2, show_default=True, help="Share of each file's cells (per label) kept out of training and recorded "
              "in pretrain.json: scl-train calibrates on them. 0 trains on every cell (scl-train then warns that calibration is optimistic).")
@click.option("--min-genes", type=int, help="Fewest model genes a file must have; default scales SCimilarity's 5,000 of 28,231.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--stream", is_flag=True, help="Leave the cells in their files and read them as training needs them, in shuffled blocks: memory stays near the batch's, "
              "not the reference's (references larger than memory; docs/train.md, \"Streamed cells\").")
@click.option("--epoch-cells", type=int, help="Train on this many cells between validations (default: every training cell once): early stopping and the "
              "learning-rate schedule count these epochs; for large references.")
@reports_input_errors
def main(data, label_key, out, gene_order, hidden, latent, epochs, batch_size, lr, triplet_weight, holdout, min_genes, seed, device, stream, epoch_cells):
    """Pretrain an encoder and decoder on labelled cells (semi-hard triplets + reconstruction)."""
    from .pretrain import narrow_embedding_warning, pretrain  # torch loads here, not for --help

    config = PretrainConfig(
        data=list(data), label_key=label_key, out=out, gene_order=gene_order, hidden_dim=_ints(hidden), latent_dim=latent,
        epochs=epochs, batch_size=batch_size, lr=lr, triplet_weight=triplet_weight, holdout=holdout, min_genes=min_genes, seed=seed, device=device,
        stream=stream, epoch_cells=epoch_cells,
    )
    written = pretrain(config)
    if written is None:  # one of several processes under torchrun, not rank 0: rank 0 reports and writes
        return
    model, summary = written
    history, spread = summary["history"], summary["embedding_feature_std"]
    click.echo(f"wrote {out}: {len(model.gene_order)} genes -> {model.hidden_dim} -> {model.latent_dim}, {len(model.labels)} labels; "
               f"last epoch loss {history[-1]['loss'] if history else 'n/a'}; embedding per-feature std {spread:.4f}")
    held = summary["held_out"]["files"]
    click.echo(f"held out {sum(len(f['held_out_rows']) for f in held):,} of {sum(f['cells'] for f in held):,} cells ({holdout:.0%} per label and file; "
               "recorded in pretrain.json): scl-train on these files calibrates on them")
    warning = narrow_embedding_warning(spread, latent)
    if warning:
        click.echo(warning, err=True)


if __name__ == "__main__":  # torchrun --nproc-per-node N -m scl.train.pretrain_cli ...
    main()
