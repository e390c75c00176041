"""scl-train: LoRA fine-tuning with a classification head, a fair baseline, merged weights and a report."""

from __future__ import annotations

import click

from scl.runtime.cli_errors import reports_input_errors

from .config import LOSSES, RECIPES, SCHEDULES, FinetuneConfig


@click.command(
    epilog="""Example (fine-tune on the 7 sorted PBMC populations; forgetting measured on brain cells):

\b
  scl-train --base-model my_base --data demo_out/data/pbmc_train.h5ad --label-key cell_type \\
      --val-data demo_out/data/pbmc_heldout.h5ad --forgetting-data train/demo_data/brain_demo.h5ad --out my_run

A reference larger than memory (cells read from the file a window at a time; an epoch of 200,000 cells):

\b
  scl-train --base-model my_base --data atlas.h5ad --out my_run --stream --epoch-cells 200000 --val-fraction 0.02

Several processes (DistributedDataParallel: gloo on CPUs, NCCL with one process per GPU):

\b
  torchrun --standalone --nproc-per-node 2 -m scl.train.finetune_cli --base-model my_base --data train.h5ad --out my_run

Three roles never share a cell: training, validation (picks the epoch) and calibration
(temperature, prediction sets, novelty p-values). Calibration cells are the ones the base held out
(scl-pretrain --holdout) or --calibration-data; with a base that saw them all it warns.

RUN_DIR then holds model/ (merged encoder, SCimilarity format), adapter/ (peft), head.pt,
calibration.json, classes.json, metrics.json, report.md, confusion_*.png and reliability.png.
Next: scl-export my_run --out my_model.onnx"""
)
@click.option("--base-model", required=True, type=click.Path(exists=True, file_okay=False), help="SCimilarity model directory (official v1.1 or from scl-pretrain).")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Labelled training .h5ad.")
@click.option("--label-key", default="cell_type", show_default=True, help="obs column with the labels.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="RUN_DIR to create: a new folder, or an empty one (the finished run appears whole, under this name).")
@click.option("--val-data", type=click.Path(exists=True, dir_okay=False), help="Labelled validation .h5ad; default: a stratified split of --data.")
@click.option("--val-fraction", default=0.2, show_default=True)
@click.option("--calibration-data", type=click.Path(exists=True, dir_okay=False), help="Labelled .h5ad used only to calibrate (temperature, "
              "prediction sets, novelty); default: the cells of --data the base model held out (scl-pretrain --holdout), or a split of --data.")
@click.option("--calibration-fraction", default=0.2, show_default=True, help="Share of --data split off for calibration when the base keeps "
              "no held-out cells of it.")
@click.option("--rank", default=8, show_default=True, help="LoRA rank r.")
@click.option("--alpha", default=16, show_default=True, help="LoRA alpha.")
@click.option("--lora-dropout", default=0.1, show_default=True, help="Dropout on the adapters' input (the base's own dropout stays off).")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default="default", show_default=True, help="Named settings under the flags given: "
              "'seed' is the seed's lr 1e-4, 5 epochs, constant rate, for reproducing earlier runs (benchmarks/recipe.py compares them).")
@click.option("--lr", default=FinetuneConfig.lr, show_default=True, help="Adam learning rate of the adapters.")
@click.option("--head-lr", default=FinetuneConfig.head_lr, show_default=True, help="Adam learning rate of the classification head.")
@click.option("--head-genes", default=FinetuneConfig.head_genes, show_default=True, help="Marker genes per class (CellTypist's feature "
              "selection) that the shipped head reads beside the fine-tuned embedding; 0: the embedding alone (the head trained with LoRA).")
@click.option("--head-c", default=FinetuneConfig.head_c, show_default=True, help="Inverse regularisation of the shipped head's logistic regression.")
@click.option("--epochs", default=FinetuneConfig.epochs, show_default=True, help="The most epochs; training stops earlier on a plateau (--patience).")
@click.option("--patience", default=FinetuneConfig.patience, show_default=True, help="Stop after this many epochs without a better "
              "validation macro-F1 (ties: lower validation loss); the best epoch's weights are kept.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=FinetuneConfig.schedule, show_default=True, help="Learning rate over "
              "training: constant, or one epoch of linear warm-up then cosine decay over --epochs.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--loss", type=click.Choice(LOSSES), default="ce+triplet+recon", show_default=True)
@click.option("--triplet-weight", default=1.0, show_default=True)
@click.option("--recon-weight", default=1.0, show_default=True)
@click.option("--forgetting-data", type=click.Path(exists=True, dir_okay=False), help="Labelled .h5ad not trained on, to measure forgetting.")
@click.option("--forgetting-label-key", default="cell_type", show_default=True)
@click.option("--ablation", is_flag=True, help="Also train CE-only and CE+triplet+recon from the same seed and tabulate them.")
@click.option("--stream", is_flag=True, help="Leave the cells in their files and read them as training needs them, in shuffled blocks: memory stays near the batch's, "
              "not the reference's (references larger than memory; docs/train.md, \"Streamed cells\").")
@click.option("--epoch-cells", type=int, help="Train on this many cells between validations (default: every training cell once): early stopping and the "
              "learning-rate schedule count these epochs; for large references.")
@click.option("--min-genes", type=int, help="Fewest model genes the data must have.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_input_errors
@click.pass_context
def main(ctx, quiet, ablation, recipe, **options):
    """Fine-tune a SCimilarity encoder with LoRA adapters and compare it with frozen-encoder baselines."""
    given = {name for name in options if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    options |= {name: value for name, value in RECIPES[recipe].items() if name not in given}
    from .finetune import finetune
    from .epoch_choice import epoch_line
    from .report import calibration_lines

    metrics = finetune(FinetuneConfig(**options), progress=not quiet, ablation=ablation)
    if metrics is None:  # one of several processes under torchrun, not rank 0: rank 0 reports and writes
        return
    p = metrics["parameters"]
    click.echo(f"trainable parameters: {p['trainable']:,} of {p['total']:,} ({100 * p['trainable'] / p['total']:.2f}%)")
    click.echo(f"{'method':<16}{'top1':>8}{'macro-F1':>10}{'bal.acc':>9}")
    for name, m in metrics["methods"].items():
        click.echo(f"{name:<16}{m['top1']:>8.4f}{m['macro_f1']:>10.4f}{m['balanced_accuracy']:>9.4f}")
    click.echo(f"validation: {metrics['validation']['source']}" + ("; OPTIMISTIC: the base saw them" if metrics["validation"]["optimistic"] else ""))
    click.echo(epoch_line(metrics["epochs"]))
    for line in calibration_lines(metrics):
        click.echo(line)
    checks = metrics["sanity_checks"]
    click.echo(f"sanity checks {'passed' if checks['passed'] else 'FAILED'}: {checks}")
    click.echo(f"wrote {options['out']}/ (report.md, metrics.json, model/, adapter/, head.pt)")
    if not checks["passed"]:
        raise SystemExit(3)


if __name__ == "__main__":  # torchrun --nproc-per-node N -m scl.train.finetune_cli ...
    main()
