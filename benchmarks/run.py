"""scl's benchmark suite: throughput, memory, accuracy and training cost, side by side in one run.

    python benchmarks/run.py            # full: 50,000 cells; memory at 50,000 and 200,000; real-size training (about 20 min, 6 GB disk)
    python benchmarks/run.py --smoke    # tiny sizes, about a minute; what the tests run so the suite cannot rot

Writes benchmarks/results/<machine>.json and .md (the README's tables come from the .md). Needs ../shared/data
(--data). Sections:
- Throughput at SCimilarity's real size (28,231 genes -> 1024 -> 1024 -> 128, random weights) on one generated
  CSR h5ad: SCimilarity's align_dataset + lognorm_counts + CellEmbedding.get_embeddings + the head in torch (and
  get_embeddings alone), scl's merged torch model, bare onnxruntime fp32 and int8 (pre-aligned dense input, as
  counts for the graph to normalise and already normalised), and scl-annotate end to end from the file (the best of
  three runs, as the bare rows are the best of three layouts). Shares
  of the matmul peak for int8 are fp32-equivalent (int8 can exceed 100%).
- Peak RSS of scl-annotate at two sizes.
- Accuracy on the real held-out PBMCs (benchmarks/accuracy.py): torch against onnxruntime fp32, int8 and fp16,
  and CellTypist trained on the same cells; the share of cells beyond the novelty limits in three real files.
- Training cost, LoRA against full fine-tuning (benchmarks/training_cost.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def machine_name() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return f"{os.cpu_count()}cpu-" + "".join(c if c.isalnum() else "-" for c in cpu)[:40].strip("-")


def matmul_gflops(n: int = 2048, repeats: int = 10, trials: int = 3) -> float:
    """numpy float32 matmul GFLOP/s, the best of a few trials (a shared machine only ever slows it)."""
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    a @ b
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9)
    return best


def model_mflop_per_cell(n_genes: int, n_classes: int) -> float:
    return 2 * (n_genes * 1024 + 1024 * 1024 + 1024 * 128 + 128 * n_classes) / 1e6


def rate(fn, n_cells: int) -> float:
    t = time.perf_counter()
    fn()
    return n_cells / (time.perf_counter() - t)


def dense_blocks(h5ad: str, genes, block: int):
    from scl.runtime.expression import ExpressionSource, ReadOptions

    with ExpressionSource(h5ad, genes, ReadOptions(batch_size=block)) as src:
        return [x for _, x in src.blocks(normalise=False)]


def scimilarity_path(h5ad: str, model_dir: str, head, genes) -> tuple[float, float]:
    """What users run today on an AnnData in memory: align_dataset, lognorm_counts, get_embeddings, the head.
    Returns (cells/s with alignment and normalisation, cells/s of get_embeddings + head alone)."""
    import anndata as ad
    import torch
    from scimilarity import CellEmbedding
    from scimilarity.utils import align_dataset, lognorm_counts

    raw = ad.read_h5ad(h5ad)
    raw.layers["counts"] = raw.X
    ce = CellEmbedding(model_path=model_dir)
    timings = {}

    def run():
        t = time.perf_counter()
        adata = lognorm_counts(align_dataset(raw, genes))
        timings["prepare"] = time.perf_counter() - t
        t = time.perf_counter()
        z = ce.get_embeddings(adata.X, buffer_size=1024)
        with torch.no_grad():
            torch.softmax(torch.from_numpy(z) @ head.weight.T + head.bias, dim=1)  # a linear head on SCimilarity's embedding
        timings["embed"] = time.perf_counter() - t

    full = rate(run, raw.n_obs)
    return full, raw.n_obs / timings["embed"]


def torch_path(blocks, model, head) -> float:
    import torch

    from scl.export.graph import AnnotationModel

    module = AnnotationModel(model.encoder, head).eval()
    flag = torch.zeros(1)

    def run():
        with torch.no_grad():
            for x in blocks:
                module(torch.from_numpy(x), flag)

    return rate(run, sum(len(b) for b in blocks))


def bare_onnxruntime(path, blocks, lognorm_input: bool = False, provider: str = "CPUExecutionProvider") -> float:
    """The model alone on pre-aligned dense input, the best of: one session using every core on batches of 256
    and 1,024 cells, and (on the CPU) one-thread runs of 256 cells side by side, one per core (scl-annotate's
    layout). With lognorm_input the blocks are already normalised and the graph skips its normalisation."""
    import onnxruntime as ort

    flag = np.full(1, float(lognorm_input), np.float32)
    n = sum(len(b) for b in blocks)

    def batches(size):
        return [x[i : i + size] for x in blocks for i in range(0, len(x), size)]

    def session(threads=None):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        s = ort.InferenceSession(str(path), options, providers=[provider])
        s.run(None, {"counts": blocks[0][:8], "input_is_lognorm": flag})
        return s

    shared = session()
    rates = [rate(lambda b=batches(size): [shared.run(None, {"counts": x, "input_is_lognorm": flag}) for x in b], n) for size in (256, 1024)]
    if provider == "CPUExecutionProvider":
        from concurrent.futures import ThreadPoolExecutor

        single = session(threads=1)
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            rates.append(rate(lambda b=batches(256): list(pool.map(lambda x: single.run(None, {"counts": x, "input_is_lognorm": flag}), b)), n))
    return max(rates)


def annotate_cli(h5ad: str, model: Path, out_dir: Path, device: str = "cpu", extra=()) -> dict:
    """scl-annotate in its own process (`extra`: more of its options); its report's cells/s and the process's peak RSS."""
    report = out_dir / "report.json"
    cmd = [str(Path(sys.executable).parent / "scl-annotate"), h5ad, "--model", str(model), "--output", str(out_dir / "calls.csv"), "--quiet",
           "--report", str(report), "--device", device, *extra]
    probe = "import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"scl-annotate failed in the benchmark: {done.stderr.strip()}")
    wall = time.perf_counter() - t
    result = json.loads(report.read_text())
    return {"cells_per_second": result["cells_per_second"], "wall_seconds": round(wall, 2), "peak_rss_mb": int(done.stdout.split()[-1]) / 1024}


def annotate_rate(h5ad: str, model: Path, out_dir: Path, device: str = "cpu", runs: int = 3) -> float:
    """scl-annotate's cells/s, the best of a few runs (as the bare rows are the best of a few layouts)."""
    return max(annotate_cli(h5ad, model, out_dir, device)["cells_per_second"] for _ in range(runs))


def interleaved_best(h5ad: str, model: Path, tmp: Path, configs: dict[str, list], rounds: int, ratio_key: str) -> dict:
    """scl-annotate once per configuration (name -> extra options) per round, interleaved so that the shared machine's
    noise falls on all alike; per configuration the best round's cells/s, the peak RSS over all rounds, and
    `ratio_key`: cells/s as a share of the first configuration's."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, extra in configs.items():
            got = annotate_cli(h5ad, model, tmp, extra=extra)
            keep = best.get(name)
            if keep is None or got["cells_per_second"] > keep["cells_per_second"]:
                best[name] = got | {"peak_rss_mb": max(got["peak_rss_mb"], keep["peak_rss_mb"] if keep else 0)}
    first = best[next(iter(configs))]["cells_per_second"]
    return {name: r | {ratio_key: round(r["cells_per_second"] / first, 3)} for name, r in best.items()}


def throughput(genes: list[str], cells: int, tmp: Path, runs: int = 3) -> dict:
    from synthetic import random_model, write_csr_h5ad, write_onnx

    from scl.runtime.normalize import lognorm
    from scl.train.model_dir import save_model_dir

    model, head = random_model(genes)
    save_model_dir(tmp / "model_dir", model)
    fp32, int8, fp16 = write_onnx(model, head, tmp / "model.onnx")
    h5ad = str(tmp / "cells.h5ad")
    write_csr_h5ad(h5ad, genes, cells)
    blocks = dense_blocks(h5ad, genes, 1024)
    sc_full, sc_embed = scimilarity_path(h5ad, str(tmp / "model_dir"), head, genes)
    paths = {
        "scimilarity_align_lognorm_embed_torch": sc_full,
        "scimilarity_get_embeddings_only_torch": sc_embed,
        "scl_merged_torch": torch_path(blocks, model, head),
        "onnxruntime_fp32_bare": bare_onnxruntime(fp32, blocks),
        "onnxruntime_int8_bare": bare_onnxruntime(int8, blocks),
    }
    for x in blocks:
        lognorm(x)
    paths["onnxruntime_fp32_bare_lognorm_input"] = bare_onnxruntime(fp32, blocks, lognorm_input=True)
    paths["onnxruntime_int8_bare_lognorm_input"] = bare_onnxruntime(int8, blocks, lognorm_input=True)
    if cuda_device():  # fp16 is for CUDA; the blocks are normalised by now
        for name, path in (("fp32", fp32), ("fp16", fp16)):
            paths[f"onnxruntime_{name}_cuda_bare_lognorm_input"] = bare_onnxruntime(path, blocks, lognorm_input=True, provider="CUDAExecutionProvider")
            paths[f"scl_annotate_{name}_cuda_end_to_end"] = annotate_rate(h5ad, path, tmp, device="cuda", runs=runs)
    del blocks
    for name, path in (("fp32", fp32), ("int8", int8)):
        paths[f"scl_annotate_{name}_end_to_end"] = annotate_rate(h5ad, path, tmp, runs=runs)
    peak = matmul_gflops()
    mflop = model_mflop_per_cell(len(genes), len(model.labels))
    base = paths["scimilarity_align_lognorm_embed_torch"]
    return {
        "paths": {name: {"cells_per_second": round(v, 1), "ratio_to_scimilarity": round(v / base, 2), "share_of_matmul_peak": round(v * mflop / 1e3 / peak, 3)}
                  for name, v in paths.items()},
        # The exported model is run bare on counts (its input as exported) and on normalised rows (its
        # normalisation skipped). scl-annotate normalises each block's nonzeros itself and feeds normalised rows,
        # so the second is the stricter measure of what reading and aligning cost.
        "end_to_end_vs_bare": {k: {kind: round(paths[f"scl_annotate_{k}_end_to_end"] / paths[f"onnxruntime_{k}_bare{suffix}"], 3)
                                   for kind, suffix in (("counts_input", ""), ("lognorm_input", "_lognorm_input"))}
                               for k in ("fp32", "int8")},
        "matmul_peak_gflops": round(peak, 1),
        "model_mflop_per_cell": round(mflop, 1),
        "h5ad": h5ad,
    }


def peak_memory(genes: list[str], sizes: list[int], tmp: Path) -> dict:
    from synthetic import write_csr_h5ad

    memory = {}
    for n in sizes:
        path = str(tmp / f"mem{n}.h5ad")
        write_csr_h5ad(path, genes, n, seed=n)
        memory[n] = annotate_cli(path, tmp / "model.int8.onnx", tmp)["peak_rss_mb"]
        os.unlink(path)
    return {"peak_rss_mb": {str(k): round(v, 1) for k, v in memory.items()}, "ratio_largest_to_smallest": round(memory[max(sizes)] / memory[min(sizes)], 3)}


def cuda_device() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return "CUDA (name unknown without torch)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=50000)
    parser.add_argument("--memory-cells", default="50000,200000")
    parser.add_argument("--data", default=str(HERE.parents[1] / "shared/data"), help="the shared data folder (PBMC, brain, gene order)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cells, args.memory_cells = 300, "200,400"
    from accuracy import celltypist_comparison, novelty_shares, onnx_parity, split_pbmc, train_and_export
    from training_cost import compare as training_cost

    data = Path(args.data)
    gene_order = str(data / "scimilarity_gene_order.tsv")
    genes = Path(gene_order).read_text().split()
    results = {"machine": machine_name(), "cores": os.cpu_count(), "cells": args.cells, "genes": len(genes), "detected_genes_per_cell": 2500,
               "command": "python benchmarks/run.py" + (" --smoke" if args.smoke else ""), "date": time.strftime("%Y-%m-%d"), "cuda_device": cuda_device()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["throughput"] = throughput(genes, args.cells, tmp, runs=1 if args.smoke else 3)
        results["memory"] = peak_memory(genes, [int(v) for v in args.memory_cells.split(",")], tmp)
        train, val = split_pbmc(str(data / "pbmc_sorted_dev.h5ad"), tmp, cells=300 if args.smoke else None)
        run_dir, models = train_and_export(train, val, str(data / "darmanis_brain_466.h5ad"), gene_order, tmp, args.smoke)
        results["accuracy"] = onnx_parity(run_dir, models, val)
        results["novelty"] = novelty_shares(models["fp32"], {"held-out PBMCs (the trained types)": val,
                                                             "brain cells (no brain class; the base was pretrained on them)": str(data / "darmanis_brain_466.h5ad"),
                                                             "CellTypist's sample PBMCs (another lab, more genes)": str(data / "celltypist_sample_559cells.csv.gz")})
        results["celltypist"] = celltypist_comparison(train, val, results["throughput"].pop("h5ad"), min(args.cells, 20000))
        results["training_cost"] = training_cost(str(tmp / "base"), train, val, epochs=1 if args.smoke else 2)
    if results["cuda_device"] is None:
        results["cuda"] = "no usable CUDA device on this machine: the CUDA and fp16 rows were not measured"
    write_results(results, Path(args.out), args.smoke)
    return results


def write_results(results: dict, out: Path, smoke: bool, kind: str = "", table=None) -> str:
    """<machine>[-kind][-smoke].json and .md in `out`; returns the markdown (`table(results)`, this suite's by default)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (results["machine"] + (f"-{kind}" if kind else "") + ("-smoke" if smoke else ""))
    text = (table or markdown)(results)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(text)
    return text


def markdown(r: dict) -> str:
    t, acc, ct, cost = r["throughput"], r["accuracy"], r["celltypist"], r["training_cost"]
    lines = [f"Machine {r['machine']} ({r['cores']} cores), {r['date']}; `{r['command']}`. CUDA: {r['cuda_device'] or 'none (not measured)'}.", "",
             f"**Throughput**: {r['cells']:,} cells x {r['genes']:,} genes (CSR, 2,500 detected per cell), random weights at SCimilarity's size.", "",
             "| path | cells/s | vs SCimilarity (align + lognorm + embed) | share of matmul peak |", "|---|---|---|---|"]
    for name, p in t["paths"].items():
        lines.append(f"| {name} | {p['cells_per_second']:,.0f} | {p['ratio_to_scimilarity']:.2f}x | {100 * p['share_of_matmul_peak']:.0f}% |")
    mem = r["memory"]
    vs = t["end_to_end_vs_bare"]
    lines += ["", f"scl-annotate end to end vs the bare model fed counts: fp32 {vs['fp32']['counts_input']:.2f}, int8 {vs['int8']['counts_input']:.2f}; "
              f"vs the bare model fed normalised rows (stricter: scl-annotate normalises outside the graph): fp32 {vs['fp32']['lognorm_input']:.2f}, "
              f"int8 {vs['int8']['lognorm_input']:.2f}. "
              f"Dense matmul peak {t['matmul_peak_gflops']} GFLOP/s; model {t['model_mflop_per_cell']} MFLOP per cell. "
              "Peak RSS of scl-annotate (int8): " + ", ".join(f"{int(k):,} cells {v:,.0f} MB" for k, v in mem["peak_rss_mb"].items())
              + f" (ratio {mem['ratio_largest_to_smallest']}).", "",
              f"**Accuracy** on {acc['cells']} held-out PBMCs (real cells, 7 sorted populations; {acc['provider']}):", "",
              "| model | macro-F1 | labels equal to torch | max abs embedding difference |", "|---|---|---|---|"]
    for name, v in acc["variants"].items():
        if "skipped" in v:
            lines.append(f"| {name} | skipped: {v['skipped']} | | |")
        else:
            lines.append(f"| {name} | {v['macro_f1']:.3f} | {100 * v['label_agreement_with_torch']:.1f}% | {v['max_abs_diff_embedding']:.1e} |")
    e2e = t["paths"]["scl_annotate_fp32_end_to_end"]["cells_per_second"]
    lines.append(f"| CellTypist {ct['version']} ({ct['method']}, scikit-learn {ct['scikit_learn']}) | {ct['macro_f1']:.3f} | | |")
    lines += ["", f"CellTypist annotates {ct['cells_per_second']:,.0f} cells/s on {ct['throughput_cells']:,} of the throughput cells "
              f"(normalise + annotate in memory; {ct['features']:,} genes); scl-annotate fp32 {e2e:,.0f} cells/s from the file "
              f"({e2e / ct['cells_per_second']:.2f}x).", "",
              "Cells flagged novel by the fp32 model (novelty p <= 0.01 among its calibration cells; what `--max-novelty auto` labels unassigned): "
              + "; ".join(f"{name} {100 * v['share_novel']:.1f}% of {v['cells']:,}" for name, v in r["novelty"].items()) + ".", "",
              "**Training cost**: LoRA against full fine-tuning of the encoder, same data, losses and batches:", "",
              "| method | lr | trainable parameters | s per epoch | peak RSS MB | RSS growth in training MB | best val macro-F1 |", "|---|---|---|---|---|---|---|"]
    for name, m in cost["methods"].items():
        lines.append(f"| {name} | {m['lr']:g} | {m['trainable_parameters']:,} of {m['total_parameters']:,} | {m['seconds_per_epoch']:.1f} | {m['peak_rss_mb']:,.0f} | "
                     f"{m['peak_rss_mb'] - m['rss_before_training_mb']:,.0f} | {m['best_val_macro_f1']:.3f} |")
    ratio = cost["lora_vs_full"]
    lines += ["", f"LoRA / full: parameters {ratio['trainable_parameters']:.4f}, time per epoch {ratio['seconds_per_epoch']:.2f}, "
              f"peak RSS {ratio['peak_rss']:.2f}, RSS growth in training {ratio['training_rss_growth']:.2f} "
              f"({cost['methods']['lora']['device']}, {cost['methods']['lora']['cells']:,} cells, {cost['methods']['lora']['epochs']} epochs)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
