"""scl-reference: build a labelled reference from .h5ad files, and search it for the cells most like a query."""

from __future__ import annotations

import csv
from collections import Counter

import click

from .cli_errors import reports_input_errors
from .reference import DEFAULT_K, HOLDOUT_SHARE


@click.group(epilog="""Examples:

\b
  scl-reference build atlas1.h5ad atlas2.h5ad --model model.onnx --label-key cell_type \\
      --keep-obs study,donor --out atlas.sclref
  scl-annotate query.h5ad --model model.onnx --reference atlas.sclref     # + knn_label, knn_min_dist, ...
  scl-reference search query.h5ad --reference atlas.sclref --model model.onnx -k 100 --output hits.csv
  scl-reference search query.h5ad --reference atlas.sclref --model model.onnx --by leiden --output hits.csv""")
def main():
    """Labelled references: annotation by nearest reference cells, and cell search."""


@main.command(epilog="""Example:

\b
  scl-reference build atlas1.h5ad atlas2.h5ad --model model.onnx --label-key cell_type --keep-obs study --out atlas.sclref

Writes atlas.sclref/ (reference.json: the card; cells.h5; the index) whole or not at all.""")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False), help="The .onnx whose embedding the reference is in.")
@click.option("--label-key", default="cell_type", show_default=True, help="obs column with each cell's label; cells without one are left out.")
@click.option("--keep-obs", default="", help="obs columns to keep per cell, comma-separated (reported with search hits).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The reference folder to write (*.sclref).")
@click.option("--index", type=click.Choice(["auto", "exact", "hnsw"]), default="auto", show_default=True,
              help="auto: exact search up to 10,000 cells, else an HNSW graph (needs scl[reference]).")
@click.option("--min-genes", type=int, help="Fewest model genes an input must have (default: SCimilarity's 5,000 of 28,231, scaled).")
@click.option("--holdout", default=HOLDOUT_SHARE, show_default=True, help="Share of cells kept out of the index to judge novelty (at most 5,000).")
@click.option("--overwrite", is_flag=True, help="Replace a reference already at --out.")
@click.option("--quiet", is_flag=True)
@reports_input_errors
def build(inputs, model, label_key, keep_obs, out, index, min_genes, holdout, overwrite, quiet):
    """Embed the labelled cells of INPUTS (.h5ad or .zarr) with MODEL and index them."""
    from .annotator import Annotator
    from .expression import ReadOptions
    from .reference import Reference, check_out

    check_out(out, overwrite)  # before minutes of embedding, not after
    annotator = Annotator(model)
    keep = [c for c in keep_obs.split(",") if c]
    reference = Reference.build(list(inputs), annotator, label_key, keep, index, holdout, progress=not quiet, read=ReadOptions(min_genes=min_genes))
    reference.save(out, overwrite)
    if not quiet:
        card = reference.card
        click.echo(f"{out}: {card['cells']:,} cells, {len(card['labels'])} labels, {card['index']['kind']} index; "
                   f"{card['holdout']['cells']:,} held out to judge novelty")
        for label, n in list(card["cells_per_label"].items())[:20]:
            click.echo(f"    {label:<30} {n:>9,}")


@main.command("import", epilog="""Example:

\b
  scl-export scimilarity_model_v1.1 --out scimilarity.onnx      # the base itself, encoder only
  scl-reference import scimilarity_model_v1.1 --model scimilarity.onnx --out scimilarity.sclref
  scl-annotate query.h5ad --model scimilarity.onnx --reference scimilarity.sclref""")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False), help="MODEL_DIR's encoder as scl-export wrote it.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The reference folder to write (*.sclref).")
@click.option("--overwrite", is_flag=True, help="Replace a reference already at --out.")
@reports_input_errors
def import_scimilarity(model_dir, model, out, overwrite):
    """SCimilarity's shipped annotation reference (MODEL_DIR/annotation/labelled_kNN.bin and reference_labels.tsv)
    as a reference file, for torch-free annotation by its neighbours."""
    from .annotator import Annotator
    from .reference import Reference

    reference = Reference.from_scimilarity(model_dir, Annotator(model))
    reference.save(out, overwrite)
    click.echo(f"{out}: {len(reference):,} cells, {len(reference.labels)} labels (SCimilarity's index, M {reference.index.m}, "
               f"searched at ef {reference.index.ef})")


@main.command(epilog="""Examples:

\b
  scl-reference search query.h5ad --reference atlas.sclref --model model.onnx -k 100 --output hits.csv
  scl-reference search query.h5ad --reference atlas.sclref --model model.onnx --by leiden --output hits.csv

One row per hit: query (cell id, or group with --by), rank, reference cell id, cosine distance, label and the
reference's kept obs columns. With --by, each group is searched from its cells' mean embedding (SCimilarity's
centroid search).""")
@click.argument("query", type=click.Path(exists=True))
@click.option("--reference", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False), help="The model the reference was built with.")
@click.option("-k", default=DEFAULT_K, show_default=True, type=click.IntRange(min=1), help="Hits per query cell or group.")
@click.option("--by", help="obs column of QUERY: search once per group, from its centroid.")
@click.option("--min-genes", type=int, help="Fewest model genes QUERY must have (default: SCimilarity's 5,000 of 28,231, scaled).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="CSV of hits.")
@click.option("--quiet", is_flag=True)
@reports_input_errors
def search(query, reference, model, k, by, min_genes, output, quiet):
    """Find the reference cells most like each cell (or group) of QUERY."""
    from .annotator import Annotator
    from .atomic import atomic_path
    from .expression import ReadOptions
    from .reference import Reference
    from .voting import given_clusters

    ref = Reference.load(reference)
    annotator = Annotator(model)
    ref.check_model(annotator)
    with annotator.open(query, read=ReadOptions(min_genes=min_genes)) as source:
        ids, groups = source.cell_ids, given_clusters(by, query, source) if by else None
    table = ref.hits(annotator.embed(query, min_genes=min_genes, progress=not quiet), k, ids, groups)
    with atomic_path(output, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(table))
        writer.writerows(zip(*table.values()))
    if not quiet:
        click.echo(f"{output}: {len(table['query']):,} hits ({k} per {'group' if by else 'cell'})")
        for key in ["label"] + ref.card["keep_obs"][:2]:
            counts = Counter(table[key].tolist()).most_common(8)
            click.echo(f"  hits by {key}: " + ", ".join(f"{name} {100 * n / len(table[key]):.1f}%" for name, n in counts))
