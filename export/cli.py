"""scl-export: a trained run to one self-contained ONNX file (plus int8 and fp16 variants), each validated; a thin
shell over export_run.export_run."""

from __future__ import annotations

from pathlib import Path

import click

from scl.runtime.cli_errors import reports_input_errors


@click.command(
    epilog="""Example:

\b
  scl-export my_run --out my_model.onnx --quantize int8 --fp16

writes my_model.onnx, my_model.int8.onnx and my_model.fp16.onnx, each with <file>.validation.json
beside it (largest difference to torch, label agreement); nothing is replaced unless it passes.
Annotate with: scl-annotate demo_out/data/pbmc_heldout.h5ad --model my_model.onnx


  scl-export my_base --out my_base.onnx     # a base model folder (no head): embeddings only,
      # for scl-reference build and scl-annotate --reference"""
)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The fp32 .onnx file to write.")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", show_default=True, help="Also write a dynamic int8 variant (<out>.int8.onnx) for CPUs.")
@click.option("--fp16", is_flag=True, help="Also write an fp16 variant (<out>.fp16.onnx) for CUDA GPUs.")
@click.option("--sample-data", type=click.Path(exists=True, dir_okay=False), help="Cells to validate on; default: the run's validation or training data.")
@click.option("--sample-cells", "n_sample", default=512, type=click.IntRange(min=1), show_default=True, help="How many cells to validate on.")
@reports_input_errors
def main(run_dir, out, quantize, fp16, sample_data, n_sample):
    """Export a scl-train RUN_DIR as one ONNX graph: normalisation, encoder, classifier, with metadata (or a base
    model folder, encoder only)."""
    from .export_run import export_run, summary_line

    for r in export_run(run_dir, out, quantize, fp16, sample_data, n_sample):
        click.echo(summary_line(r))
        if "warning" in r:
            click.secho(f"warning: {Path(r['path']).name}: {r['warning']} ({Path(out).name}).", fg="yellow", err=True)
