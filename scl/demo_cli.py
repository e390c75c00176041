"""scl-demo: the whole pipeline, offline, on real cells shipped with scl.

pretrain a base (brain + PBMC training cells, SCimilarity's 28,231-gene order) -> LoRA fine-tune on the 7 sorted PBMC
populations -> report -> export fp32 and int8 -> annotate the held-out PBMC cells and 100 unlabelled cells.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path

import click

from scl.runtime.cli_errors import reports_input_errors

DATA = ("pbmc_demo.h5ad", "brain_demo.h5ad", "unlabelled_100cells.csv.gz", "scimilarity_gene_order.tsv")


def demo_file(name: str) -> str:
    return str(resources.files("scl.train").joinpath("demo_data", name))


def split_pbmc(out: Path, seed: int) -> tuple[str, str]:
    import anndata as ad

    from scl.train.data import write_stratified_split

    paths = str(out / "pbmc_train.h5ad"), str(out / "pbmc_heldout.h5ad")
    return write_stratified_split(ad.read_h5ad(demo_file("pbmc_demo.h5ad")), paths, test_size=0.25, seed=seed)


def step(title: str) -> None:
    click.secho(f"\n== {title}", bold=True)


@click.command(
    epilog="""Example:

\b
  scl-demo --out demo_out            # full size, about a minute on a 2-core CPU
  scl-demo --out demo_fast --fast    # small network and few epochs, about 20 s (what the tests run)"""
)
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False), help="Folder for everything the demo writes.")
@click.option("--fast", is_flag=True, help="Small network (256, 128 -> 32) and 2 epochs: checks the pipeline, not the model.")
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo in --out (only a folder that holds one).")
@reports_input_errors
def main(out, fast, seed, overwrite):
    """Run pretrain -> fine-tune -> report -> export -> annotate on bundled real cells."""
    from scl.export.export_run import export_run, summary_line
    from scl.runtime.file_driver import annotate_file
    from scl.runtime.annotate_cli import print_summary
    from scl.runtime.annotator import AnnotateOptions, Annotator
    from scl.runtime.expression import ReadOptions

    from scl.train.config import FinetuneConfig, PretrainConfig
    from scl.train.finetune import finetune
    from scl.train.pretrain import pretrain

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        earlier = (out / "demo_summary.json").exists() or (out / "run").is_dir() or (out / "base_model").is_dir()
        if not earlier:
            raise click.ClickException(f"{out} holds files that are not a demo's; choose another --out.")
        if not overwrite:
            raise click.ClickException(f"{out} holds an earlier demo; add --overwrite to replace it, or choose another --out.")
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    step("1/5 data: 840 FACS-sorted PBMCs (7 populations), 144 brain cells (9 types), 100 unlabelled cells")
    train, heldout = split_pbmc(out / "data", seed)
    click.echo(f"PBMC split 3:1 by population -> {train}, {heldout}")

    step("2/5 pretrain a base model in SCimilarity's 28,231-gene order (brain + PBMC training cells)")
    size = dict(hidden_dim=[256, 128], latent_dim=32, epochs=2) if fast else dict(epochs=15)
    # SCimilarity's triplet weight (0.001) suits millions of cells; on a thousand, reconstruction dominates and the
    # embedding collapses into a narrow cone (per-feature std ~0.002), which makes any classifier on it ill-conditioned.
    # 0.1 still left this demo's base narrow (per-feature std 0.006, probe row norms ~3,400: float rounding then moves
    # probabilities by 1e-4); 0.5 on the full PBMC split + brain cells: std 0.018, row norms 13 (README, scl-pretrain).
    pretrain(PretrainConfig(data=[train, demo_file("brain_demo.h5ad")], out=str(out / "base_model"), gene_order=demo_file("scimilarity_gene_order.tsv"),
                            triplet_weight=0.5, seed=seed, **size))

    step("3/5 LoRA fine-tune on the PBMC populations, against frozen-encoder baselines")
    metrics = finetune(FinetuneConfig(base_model=str(out / "base_model"), data=train, val_data=heldout, out=str(out / "run"),
                                      forgetting_data=demo_file("brain_demo.h5ad"), seed=seed, **({"epochs": 2} if fast else {})))
    for name, m in metrics["methods"].items():
        click.echo(f"  {name:<12} macro-F1 {m['macro_f1']:.3f}  top-1 {m['top1']:.3f}")

    step("4/5 export fp32 and int8 ONNX")
    for result in export_run(out / "run", out / "model.onnx", quantize="int8"):
        click.echo(f"  {summary_line(result)}")
        if "warning" in result:
            click.secho(f"  warning: {result['warning']}", fg="yellow")

    step("5/5 annotate held-out PBMCs (prediction sets at alpha 0.05) and the unlabelled CSV with onnxruntime (fp32)")
    annotator = Annotator(out / "model.onnx")
    reports = [
        annotate_file(heldout, str(out / "pbmc_heldout.scl.h5ad"), annotator, ReadOptions(), AnnotateOptions(progress=False, alpha=0.05)),
        annotate_file(demo_file("unlabelled_100cells.csv.gz"), str(out / "unlabelled.scl.csv"), annotator, ReadOptions(), AnnotateOptions(progress=False)),
    ]
    for report in reports:
        print_summary(report)
    (out / "demo_summary.json").write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1), "methods": {k: {s: v[s] for s in ("macro_f1", "top1")} for k, v in metrics["methods"].items()}, "annotations": [r.to_dict() for r in reports]}, indent=1))

    step(f"done in {time.perf_counter() - started:.0f} s; outputs in {out}/")
    for path, what in (("base_model/", "the pretrained base (SCimilarity format)"), ("run/report.md", "the training report; confusion_*.png beside it"),
                       ("run/model/", "the merged fine-tuned encoder (SCimilarity format)"), ("model.onnx, model.int8.onnx", "the exported models (+ .validation.json)"),
                       ("pbmc_heldout.scl.h5ad", "held-out cells with scl_* obs columns and obsm['X_scl']"), ("unlabelled.scl.csv", "one row per unlabelled cell")):
        click.echo(f"  {out}/{path:<28} {what}")
