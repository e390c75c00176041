"""scl-annotate: cell types for .h5ad and CSV/TSV files with onnxruntime alone (no torch)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from pathlib import Path

import click

from . import on_dask
from .bounds import Bounds, check_setting
from .cli_errors import reports_input_errors
from .errors import SclError
from .expression import ReadOptions
from .h5ad import DEFAULT_CSC_LIMIT_BYTES, MATRIX_CHOICES
from .normalize import INPUT_KINDS
from .places import Place, refuse_clashes
from .reference import DEFAULT_K


POSITIVE_GIB = Bounds(0, low_open=True, words="a positive number of GiB")


def expand_inputs(patterns: tuple[str, ...], shard: str | None) -> list[str]:
    paths = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not found:
            raise SclError(f"{pattern}: matches no file.")
        paths += found
    if shard:
        try:
            k, n = (int(v) for v in shard.split("/"))
        except ValueError:
            k, n = -1, 0
        if not 0 <= k < n:  # an if, not an assert: python -O drops asserts
            raise SclError(f"--shard {shard!r}: write K/N with 0 <= K < N, e.g. --shard $SLURM_ARRAY_TASK_ID/16.")
        paths = paths[k::n]
    return paths


def output_for(path: str, output: str | None, output_dir: str | None, fmt: str | None, many: bool) -> str:
    if output and many:
        raise SclError("--output names one file; with several inputs use --output-dir.")
    if output:
        return output
    name, folder = Path(path).name, Path(path).parent
    for suffix in (".gz", ".h5ad", ".h5", ".zarr", ".csv", ".tsv", ".txt"):
        name = name.removesuffix(suffix)
    if name.endswith("matrix.mtx"):  # a 10x MTX file is named by its GEO prefix, else by its folder, beside that folder
        name = name.removesuffix("matrix.mtx").rstrip("_.-")
        if not name:
            name, folder = folder.resolve().name, folder.resolve().parent
    fmt = fmt or ("h5ad" if path.endswith(".h5ad") else "csv")
    return str(Path(output_dir or folder) / f"{name}.scl.{fmt}")


def print_summary(report) -> None:
    """A RunReport for people: what was read, how fast, what is novel or unassigned, and the label counts."""
    source, genes = report.input, report.input["genes"]
    click.echo(f"{source['path']} -> {report.output}")
    click.echo(f"  {report.cells:,} cells from {source['matrix']} ({source['input_kind']}: {source['input_kind_evidence']}); "
               f"genes matched {genes['matched']:,} of {genes['model_genes']:,}, missing {genes['model_genes_missing']:,}, input genes unused {genes['input_genes_unused']:,}"
               + (f"; the head's marker genes missing {genes['head_genes_missing']:,} of {genes['head_genes']:,}" if genes.get("head_genes") else ""))
    click.echo(f"  {report.seconds:.2f} s, {report.cells_per_second:,.0f} cells/s on {report.model['provider']}")
    novelty = report.novelty
    if novelty["novel_cells"] is not None:
        share = 100 * novelty["novel_cells"] / max(report.cells, 1)
        hint = "labelled unassigned" if novelty["unassigned_if_novel"] else "--max-novelty auto labels them unassigned"
        click.echo(f"  novel: {novelty['novel_cells']:,} cells ({share:.1f}%), {novelty['rule']}; far more means types or data the model "
                   f"does not know: {hint}")
    if report.unassigned:
        click.echo("  unassigned: " + "; ".join(f"{e['cells']:,} {reason}" + (f" ({e['rule']})" if "rule" in e else "") + f", see --{e['setting'].replace('_', '-')}"
                                           for reason, e in report.unassigned.items()))
    sets = report.prediction_sets
    if sets:
        click.echo(f"  prediction sets at alpha {sets['alpha']:g}: mean size {sets['mean_set_size']:.2f}, single {100 * sets['single']:.1f}%, "
                   f"empty (unassigned) {100 * sets['empty']:.1f}%, every type {100 * sets['every_class']:.1f}%: {sets['promise']}")
        if sets["alpha"] < sets["smallest_alpha"]:
            click.secho(f"  warning: alpha {sets['alpha']:g} is below what the model's calibration cells support ({sets['smallest_alpha']:.2g}): "
                        "every set holds every type; use a larger --alpha or calibrate on more cells.", fg="yellow", err=True)
        elif sets["degenerate"]:
            click.secho("  warning: most sets hold (nearly) every type: they cover trivially and say little; the model cannot tell these "
                        "cells' types apart at this alpha (try a larger --alpha).", fg="yellow", err=True)
    votes = report.majority_voting
    if votes:
        click.echo(f"  majority voting over {votes['clusters']:,} clusters ({votes['clusters_from']}): "
                   f"{votes['heterogeneous_cells']:,} cells in clusters whose top label holds under {votes['min_share']:g} (heterogeneous)"
                   + (f"; {votes['unclustered_cells']:,} cells without a cluster took no part (unclustered)" if votes["unclustered_cells"] else ""))
    knn = report.neighbours
    if knn:
        novel = f"; novel by neighbours {knn['novelty']['novel_cells']:,} ({knn['novelty']['rule']})" if "novelty" in knn else ""
        agree = "" if knn["agree_with_head"] is None else f"; their label is the head's for {100 * knn['agree_with_head']:.1f}% of cells"
        click.echo(f"  neighbours: k {knn['k']} of {knn['cells']:,} reference cells ({knn['path']}){agree}{novel}")
    width = max(len(k) for k in report.labels) if report.labels else 5
    for label, n in report.labels.items():
        click.echo(f"    {label:<{width}}  {n:>8,}  {100 * n / max(report.cells, 1):5.1f}%")


@click.command(
    epilog="""Examples:

\b
  scl-annotate demo_out/data/pbmc_heldout.h5ad --model demo_out/model.onnx   # -> pbmc_heldout.scl.h5ad
  scl-annotate train/demo_data/unlabelled_100cells.csv.gz --model demo_out/model.int8.onnx \\
      --output calls.csv --probabilities
  scl-annotate 'data/*.h5ad' --model model.onnx --output-dir out --shard 3/16 --report run.json
  scl-annotate cells.h5ad --model demo_out/model.onnx --over-clustering leiden   # vote per Leiden cluster
  scl-annotate cells.h5ad --model demo_out/model.onnx --reference atlas.sclref -k 50   # + knn_label
  scl-annotate atlas.h5ad --model model.int8.onnx --dask local:8   # 8 worker processes, one output in cell order

Outputs: obs columns scl_label, scl_confidence, scl_second_label, scl_second_probability,
scl_novelty (cosine distance to the label's training centroid), scl_novelty_p, scl_genes_detected,
scl_novel, with --alpha scl_prediction_set and scl_set_size, with voting scl_cluster, scl_majority_label,
scl_majority_share; obsm['X_scl'] (embedding) and uns['scl']; or a CSV with one row per cell.
Inputs are never modified. Cells of types the model never saw still get a known label, often with
high confidence, but lie far from its centroid: the summary counts them (novel), and --max-novelty
auto labels them unassigned.

\b
  scl-annotate query.h5ad --model demo_out/model.onnx --alpha 0.05 --max-novelty auto
      # each cell's set holds its true type for >= 95% of cells like the calibration cells;
      # cells with an empty set, or novel at p <= 0.05, are unassigned"""
)
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", required=True, envvar="SCL_MODEL", type=click.Path(dir_okay=False), help="The .onnx from scl-export (or set SCL_MODEL).")
@click.option("--output", help="Output file (.h5ad or .csv) for a single input.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Folder for outputs named <input>.scl.<format>.")
@click.option("--format", "fmt", type=click.Choice(["h5ad", "csv"]), help="Output format with --output-dir; default h5ad for .h5ad inputs, csv otherwise.")
@click.option("--probabilities", is_flag=True, help="Also write every class's probability.")
@click.option("--min-confidence", default=0.0, show_default=True, help="Cells below this probability are labelled 'unassigned'.")
@click.option("--min-cell-genes", type=int, help="Cells expressing fewer of the model's genes are labelled 'unassigned' "
              "(default: 200 per 28,231 of the model's genes the input holds, at least 20; columns genes_detected, unassigned_reason).")
@click.option("--max-novelty", help="Label novel cells 'unassigned': auto (calibrated models: novelty p <= --alpha, 0.01 without it; older "
              "models: their per-class limits) or a cosine distance to the label's centroid (0-2). Default: count them only.")
@click.option("--alpha", type=float, help="Error rate you accept (calibrated models): write each cell's prediction set, which holds the "
              "true type for >= 1 - alpha of cells like the calibration cells; empty sets are 'unassigned'. Also the novelty level.")
@click.option("--majority-voting", is_flag=True, help="Give each cluster its most frequent label (scl_majority_label); clusters from "
              "--over-clustering, else an automatic over-clustering of the embedding (needs scl[voting]).")
@click.option("--over-clustering", help="obs column of an .h5ad input with clusters to vote in (implies --majority-voting).")
@click.option("--min-share", default=0.5, show_default=True, help="Clusters whose top label holds a smaller share are 'heterogeneous'.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False), help="A reference folder (scl-reference build) made with "
              "this model: also call each cell by its nearest reference cells (knn_label, knn_share, knn_min_dist, ...).")
@click.option("-k", "--neighbours", "k", default=DEFAULT_K, show_default=True, help="Reference cells that vote, with --reference.")
@click.option("--restrict-to", help="Labels to call, comma-separated (SCimilarity's safelist): the head's probabilities are renormalised "
              "over them, and only reference cells of them vote.")
@click.option("--exclude", help="Labels never to call, comma-separated (SCimilarity's blocklist).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--threads", type=int, help="Blocks annotated at once, each on one core; default: all cores.")
@click.option("--matrix", type=click.Choice(MATRIX_CHOICES), default="auto", show_default=True, help="h5ad matrix; auto takes raw counts (layers/counts, raw/X) where present.")
@click.option("--gene-column", help="var column with gene symbols or Ensembl IDs; default: the var index.")
@click.option("--input-kind", type=click.Choice(INPUT_KINDS), default="auto", show_default=True, help="counts, or lognorm for log1p(counts per 1e4).")
@click.option("--genes-as-rows", is_flag=True, help="Text input with one gene per line.")
@click.option("--min-genes", type=int, help="Fewest model genes an input must have.")
@click.option("--csc-memory-limit", default=DEFAULT_CSC_LIMIT_BYTES / 1024**3, show_default=True, help="GiB a CSC matrix may take to read by cells.")
@click.option("--batch-size", default=256, show_default=True, help="Cells per block (256 measured fastest on a 2-core CPU).")
@click.option("--shard", help="K/N: take every N-th input starting at K (0-based), for array jobs.")
@click.option("--dask", "dask_at", metavar="local:N|ADDRESS", help="Annotate on a dask cluster: local:N starts N worker processes here, "
              "or give a scheduler's address (tcp://host:8786). Each worker reads its own cells of the .h5ad/zarr input (needs scl[dask]).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the run's summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@reports_input_errors
def main(inputs, model, output, output_dir, fmt, probabilities, min_confidence, min_cell_genes, max_novelty, alpha, majority_voting, over_clustering, min_share,
         reference, k, restrict_to, exclude, device, threads, matrix, gene_column, input_kind, genes_as_rows, min_genes, csc_memory_limit, batch_size, shard, dask_at, report, quiet):
    """Annotate cell types in INPUTS (.h5ad, .csv/.tsv, optionally .gz; globs allowed)."""
    from .file_driver import annotate_file, check_folder_writable, check_output_path
    from .annotator import AnnotateOptions, Annotator
    from .reference import Reference

    paths = expand_inputs(inputs, shard)
    check_setting("csc_memory_limit", csc_memory_limit, POSITIVE_GIB, DEFAULT_CSC_LIMIT_BYTES / 1024**3)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    outputs = [output_for(path, output, output_dir, fmt, len(paths) > 1) for path in paths]
    for path, out in zip(paths, outputs):  # every output place is checked before the first cell is read
        check_output_path(path, out)
    if report:
        check_folder_writable(report, "report")
    reads = [Place(path, f"the input {path}") for path in paths] + [Place(model, "the model", "model")]
    writes = [Place(out, f"the output of {path}", "output_dir" if output_dir else "output") for path, out in zip(paths, outputs)]
    refuse_clashes(reads, writes + ([Place(report, "the report", "report")] if report else []))
    options = AnnotateOptions(min_confidence, max_novelty, not quiet, min_cell_genes, alpha, majority_voting, over_clustering, min_share,
                              Reference.load(reference) if reference else None, k, restrict_to, exclude)
    annotator = Annotator(model, device, threads)
    if options.reference is not None:
        options.reference.check_model(annotator)  # before any file, as the rules below
    read = ReadOptions(matrix=matrix, gene_column=gene_column, input_kind=input_kind, genes_as_rows=genes_as_rows,
                       min_genes=min_genes, csc_limit_bytes=int(csc_memory_limit * 1024**3), batch_size=batch_size)
    annotator.rules(options)  # a bad --max-novelty or --alpha, or one the model cannot serve, fails before any file
    reports = []
    with on_dask.connect(dask_at) if dask_at else contextlib.nullcontext() as client:
        for path, out in zip(paths, outputs):
            reports.append(annotate_file(path, out, annotator, read, options, probabilities, client))
            if not quiet:
                print_summary(reports[-1])
    if report:
        from .atomic import atomic_path

        with atomic_path(report) as tmp:
            Path(tmp).write_text(json.dumps(reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports], indent=1) + "\n")
