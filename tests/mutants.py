"""Put one-line bugs into scl one at a time and check that the tests catch each (mutation testing, by hand).

    .venv/bin/python tests/mutants.py            # every mutant, about 10 minutes
    .venv/bin/python tests/mutants.py novelty    # those whose name contains 'novelty'

tests/test_mutants_stay_current.py (in `make test`) checks that every snippet still occurs exactly once, so a change
that moves the code must bring its mutants along in the same commit.
Each mutant replaces one exact snippet in one file (the script refuses to run if the snippet is not there exactly
once), runs the tests named beside it, and restores the file whatever happens. A mutant that no test catches makes
the script exit 1. Not part of `make test`: it edits the working tree while it runs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOVELTY_TESTS = ["tests/test_calls.py", "tests/test_annotate.py::test_novelty_equals_an_independent_computation_and_scl_trains_count"]
EXPORT_TESTS = ["tests/test_export.py"]
CONFORMAL_TESTS = ["tests/test_calls.py"]
BOUNDARY_TESTS = "tests/test_boundaries.py"

MUTANTS = [
    ("novelty against the runner-up's limit", "runtime/calls.py", "novelty > rules.novelty_limits[best]", "novelty > rules.novelty_limits[second]", NOVELTY_TESTS),
    ("novelty > becomes >=", "runtime/calls.py", "novelty > rules.novelty_limits[best]", "novelty >= rules.novelty_limits[best]", NOVELTY_TESTS),
    ("centroids not unit length", "runtime/session.py", "self.centroids /= np.linalg.norm(self.centroids, axis=1, keepdims=True)",
     "self.centroids *= 1.5", NOVELTY_TESTS),
    ("min-confidence >= becomes >", "runtime/calls.py", "\"low_confidence\": confidence < rules.min_confidence", "\"low_confidence\": confidence <= rules.min_confidence", ["tests/test_calls.py"]),
    ("conformal rank floor instead of ceil", "runtime/conformal.py", "return math.ceil((n + 1) * (1 - alpha))", "return math.floor((n + 1) * (1 - alpha))", CONFORMAL_TESTS),
    ("conformal rank over n, not n + 1", "runtime/conformal.py", "return math.ceil((n + 1) * (1 - alpha))", "return math.ceil(n * (1 - alpha))", CONFORMAL_TESTS),
    ("a score at the threshold left out", "runtime/conformal.py", "<= q[None, :]", "< q[None, :]", CONFORMAL_TESTS),
    ("novelty p counts only farther cells", "runtime/conformal.py", 'side="left"', 'side="right"', CONFORMAL_TESTS),
    ("novelty p without the + 1", "runtime/conformal.py", "p[cells] = (1 + at_least) / (len(reference) + 1)", "p[cells] = at_least / len(reference)", CONFORMAL_TESTS),
    ("small classes not pooled", "runtime/conformal.py", "return (n + 1) * alpha >= 1", "return n > 0", CONFORMAL_TESTS),
    ("empty sets stay assigned", "runtime/calls.py", "failed[\"empty_set\"] = calls[\"set_size\"] == 0", "pass", CONFORMAL_TESTS),
    ("int8 quantizes every layer", "export/onnx_file.py", ", nodes_to_quantize=gene_layer_nodes(onnx.load(str(fp32_path))))", ")",
     ["tests/test_export.py::test_int8_quantizes_only_the_gene_wide_layer"]),
    ("settings let infinities through", "runtime/bounds.py", " or not math.isfinite(value)", "",
     ["tests/test_train.py::test_settings_out_of_bounds_are_refused_before_any_work"]),
    ("min_confidence above 1 accepted", "runtime/bounds.py", "PROBABILITY = Bounds(0, 1)", "PROBABILITY = Bounds(0)",
     ["tests/test_api.py::test_in_place_key_added_and_layer_choice", "tests/test_annotate.py::test_bad_models_and_outputs"]),
    ("temperature not applied in the graph", "export/graph.py", "return AnnotationModel(run.model.encoder, temperature_scaled(run.head, temperature)).eval()",
     "return AnnotationModel(run.model.encoder, run.head).eval()", ["tests/test_export.py::test_graph_inputs_outputs_and_dynamic_batch"]),
    ("min-genes < becomes <=", "runtime/genes.py", "if matched < min_overlap:", "if matched <= min_overlap:", ["tests/test_calls.py"]),
    ("min-genes 1 for small models", "runtime/genes.py", "    return min(SCIMILARITY_MIN_OVERLAP,",
     "    return 1 if n_model_genes < SCIMILARITY_GENES else min(SCIMILARITY_MIN_OVERLAP,", ["tests/test_calls.py"]),
    ("calibration on the cells the base trained on", "train/roles.py", "return np.isin(cells.rows, entry[\"held_out_rows\"])",
     "return ~np.isin(cells.rows, entry[\"held_out_rows\"])", ["tests/test_train.py::test_pretrain_holds_out_cells_and_scl_train_calibrates_on_exactly_those"]),
    ("fp32 tolerance 1e-1", "export/validate.py", "FP32_TOLERANCE = 1e-4", "FP32_TOLERANCE = 1e-1", EXPORT_TESTS),
    ("fp32 always passes", "export/validate.py", 'result["passed"] = variant != "fp32" or (', 'result["passed"] = True or (', EXPORT_TESTS),
    ("torch compared with itself", "export/validate.py", "o_probs, o_emb = onnx_outputs(path, counts, False, providers)",
     "o_probs, o_emb = t_probs, t_emb", EXPORT_TESTS),
    ("int8 warning never printed", "export/cli.py", 'if "warning" in r:', "if False:", EXPORT_TESTS),
    ("training kernels not deterministic", "train/device.py", "torch.use_deterministic_algorithms(True, warn_only=True)", "pass",
     ["tests/test_train.py::test_pretraining_twice_with_one_seed_gives_the_same_weights_bit_for_bit"]),
    ("outputs keep mkstemp's 0600", "runtime/atomic.py", "os.chmod(tmp, 0o666 & ~_UMASK)", "pass", ["tests/test_annotate.py::test_input_is_never_modified"]),
    ("empty cells count in the lognorm test", "runtime/normalize.py", "sums = sums[sums > 0]", "sums = sums",
     [f"{BOUNDARY_TESTS}::test_a_lognorm_input_whose_first_cell_is_empty_is_still_lognorm"]),
    ("narrower centroids open", "runtime/model_metadata.py", "len(centroids[0]) != latent", "len(centroids[0]) > latent",
     [f"{BOUNDARY_TESTS}::test_every_metadata_check_refuses_a_model_that_trips_it"]),
    ("raw/X before layers/counts", "runtime/h5ad.py", 'AUTO_MATRICES = ("layers/counts", "raw/X", "X")', 'AUTO_MATRICES = ("raw/X", "layers/counts", "X")',
     [f"{BOUNDARY_TESTS}::test_auto_prefers_layers_counts_over_a_lognormalised_raw"]),
    ("upper bounds exclusive", "runtime/bounds.py", "below = value < self.high if self.high_open else value <= self.high", "below = value < self.high",
     [f"{BOUNDARY_TESTS}::test_every_declared_bound_holds_exactly_at_its_limit"]),
    ("max-cells > becomes >=", "runtime/serve.py", "if x.shape[0] > max_cells:", "if x.shape[0] >= max_cells:",
     ["tests/test_serve.py::test_bad_batches_and_limits"]),
    ("two classes have no runner-up", "runtime/calls.py", "if kept.sum() > 1 else best", "if kept.sum() > 2 else best",
     [f"{BOUNDARY_TESTS}::test_second_label_and_probability_against_a_plain_loop"]),
    ("fp32 rule ignores the embedding", "export/validate.py", ' and result["max_abs_diff_embedding"] <= FP32_TOLERANCE', "",
     ["tests/test_export.py::test_an_fp32_graph_whose_embedding_alone_is_off_is_refused"]),
    ("repeated sparse entries not summed", "runtime/h5ad.py", "if rows.has_canonical_format:", "if True:",
     ["tests/test_hardening.py::test_repeated_sparse_entries_are_summed_in_memory_and_in_files"]),
    ("min_cell_genes held to the model's width", "runtime/annotator.py", "shown = len(session.gene_order) if genes_shown is None else genes_shown",
     "shown = len(session.gene_order)", ["tests/test_hardening.py::test_a_narrow_input_is_held_to_the_share_of_genes_it_can_show"]),
    ("a backed view read as its whole file", "runtime/annotator.py", "cells = np.asarray(adata.obs_names, dtype=str) if adata.is_view else None", "cells = None",
     ["tests/test_hardening.py::test_a_backed_view_is_annotated_as_its_cells_in_its_order"]),
    ("a timed-out request runs on", "runtime/serve.py", "cancelled.set()  # its pipeline stops at the next block", "pass",
     ["tests/test_serve.py::test_a_request_past_its_timeout_gets_504_and_stops_while_the_server_goes_on"]),
    ("neighbours vote unweighted", "runtime/reference.py", "weights = 1.0 / np.maximum(distances, 1e-6)", "weights = np.ones_like(distances)",
     ["tests/test_reference.py::test_the_vote_is_scimilarity_s_weighted_vote_computed_by_a_plain_loop"]),
    ("held-out cells chosen by position", "runtime/reference.py", "hashes = np.fromiter((zlib.crc32(str(i).encode()) for i in cell_ids), dtype=np.uint64, count=len(cell_ids))",
     "hashes = np.arange(len(cell_ids), dtype=np.uint64) * np.uint64(2654435761) % np.uint64(2**32)",
     ["tests/test_reference.py::test_the_cells_held_out_for_novelty_do_not_depend_on_the_files_order"]),
    ("a reference answers any model", "runtime/reference.py", 'if model_digest(annotator) != self.card["model"]["digest"]:', "if False:",
     ["tests/test_reference.py::test_a_reference_is_refused_with_another_model_in_one_line"]),
    ("a changed reference file loads", "runtime/reference.py", "integrity.file_sha256(file) != digest", "False",
     ["tests/test_reference.py::test_a_tampered_or_foreign_reference_is_refused_and_nothing_is_replaced"]),
    ("an hnswlib file of another width loads", "runtime/neighbours.py", "if stored != dim or count != n:", "if False:",
     ["tests/test_reference.py::test_scimilarity_s_own_reference_imports_and_answers_as_hnswlib_does"]),
    ("neighbours ignore the restriction", "runtime/pipeline.py", "head, self.reference_kept)", "head, None)",
     ["tests/test_reference.py::test_restricting_to_two_labels_never_yields_a_third_from_the_head_or_the_neighbours"]),
    ("the head ignores the restriction", "runtime/pipeline.py", "cell_ids=ids)), self.rules.kept)", "cell_ids=ids)), None)",
     ["tests/test_reference.py::test_restricting_to_two_labels_never_yields_a_third_from_the_head_or_the_neighbours"]),
    ("dask blocks drained out of order", "runtime/pipeline.py", "        while pending:\n            yield pending.popleft().result()",
     "        while pending:\n            yield pending.pop().result()", ["tests/test_dask.py::test_a_worker_killed_mid_run_has_its_cells_run_again_and_the_output_is_whole"]),
    ("dask workers skip the judged kind's check", "runtime/on_dask.py", "check_kind=True, rows=None", "check_kind=False, rows=None",
     ["tests/test_dask.py::test_a_worker_checks_its_cells_against_the_input_kind_the_caller_judged"]),
    ("dask workers trust any model file", "runtime/on_dask.py", "if model_digest(annotator) != job.digest:", "if False:",
     ["tests/test_dask.py::test_a_worker_refuses_a_model_file_that_is_not_the_caller_s"]),
    ("a file's row range ignored", "runtime/h5ad.py", "self.first_row = 0 if rows is None else rows[0]", "self.first_row = 0",
     ["tests/test_dask.py::test_a_worker_refuses_a_model_file_that_is_not_the_caller_s", "tests/test_readers.py::test_a_row_range_reads_those_cells_their_ids_and_obs_and_refuses_a_bad_range"]),
    ("a row range's obs values read whole", "runtime/h5ad.py", "values = read_array(self.obs_columns[key], self.rows)", "values = read_array(self.obs_columns[key])",
     ["tests/test_readers.py::test_a_row_range_reads_those_cells_their_ids_and_obs_and_refuses_a_bad_range"]),
    ("the head ignores its marker genes", "train/head.py", "            logits = logits + lognorm.index_select(1, self.gene_index) @ self.gene_weight.T  # one ONNX Gather of those columns", "            logits = logits",
     ["tests/test_head.py::test_the_graph_computes_embedding_and_marker_gene_logits"]),
    ("marker genes by the smallest coefficients", "train/head.py", "top = np.argsort(-coef, axis=1, kind=\"stable\")", "top = np.argsort(coef, axis=1, kind=\"stable\")",
     ["tests/test_head.py::test_the_head_weighs_each_population_s_known_markers"]),
    ("temperature not folded into the gene weights", "train/head.py", "self.gene_index, self.gene_weight * factor).eval()", "self.gene_index, self.gene_weight).eval()",
     ["tests/test_head.py::test_the_graph_computes_embedding_and_marker_gene_logits"]),
    ("sparse logits without the genes", "train/head.py", "            logits[i : i + LOGIT_BLOCK] += np.asarray(x[i : i + LOGIT_BLOCK].tocsr()[:, genes] @ gene_weight.T)", "            pass",
     ["tests/test_head.py::test_training_s_sparse_logits_equal_the_head_module"]),
    ("every block reads every id", "runtime/h5ad.py", "            yield self.ids(start, stop), rows", "            yield self.cell_ids[start:stop], rows",
     ["tests/test_readers.py::test_ids_whose_hashes_meet_are_compared_by_name"]),
    ("ids whose hashes meet taken for duplicates", "runtime/expression.py",
     "_refuse_duplicates([i for chunk in chunks() for i in chunk if hash(i) in met and (i in seen or seen.add(i))], path)",
     "_refuse_duplicates(sorted(met), path)", ["tests/test_readers.py::test_ids_whose_hashes_meet_are_compared_by_name"]),
    ("voting fits every cell at any size", "runtime/voting.py", "    if n <= FIT_CELLS:", "    if True:",
     ["tests/test_voting.py::test_above_fit_cells_the_centres_come_from_a_sample_and_every_cell_is_assigned"]),
    ("lazy chunks out of order", "runtime/lazy_result.py", "        return da.concatenate(pieces, axis=0)", "        return da.concatenate(pieces[::-1], axis=0)",
     ["tests/test_dask.py::test_lazy_results_are_dask_arrays_computed_once_per_chunk_on_the_cluster"]),
    ("dask tasks off the block grid", "runtime/on_dask.py", "max(batch, round((task_cells or TASK_CELLS) / batch) * batch)", "task_cells or TASK_CELLS",
     ["tests/test_dask.py::test_int8_tasks_start_on_block_boundaries_so_the_output_equals_the_plain_run"]),
    ("the first block's values never checked", "runtime/expression.py", "        check_values(first[1], self.path, first[0])\n", "",
     ["tests/test_bad_input.py"]),
    ("every process trains on the whole batch", "train/distributed.py", "return index[self.rank :: self.world_size] if self.several else index",
     "return index", ["tests/test_distributed.py"]),
    ("a run folder written in place", "train/finetune.py", "with atomic_folder(config.out) as out_dir:", "with __import__('contextlib').nullcontext(config.out) as out_dir:",
     ["tests/test_hardening.py::test_a_run_that_fails_after_training_leaves_no_run_folder_and_out_must_be_new"]),
    ("streamed cells in file order, not the order asked", "train/file_rows.py", "        return rows[back]", "        return rows",
     ["tests/test_stream.py::test_streamed_cells_are_the_cells_in_memory_in_the_same_roles"]),
    ("a streamed file rewritten mid-run goes unnoticed", "train/file_rows.py", "            if _stamp(src.path) != stamp:", "            if False:",
     ["tests/test_stream.py::test_a_file_rewritten_during_a_streamed_run_is_refused_and_nothing_is_written"]),
    ("a process reads every cell of a window, not its share", "train/data.py", "    while group := [share(b) for b in", "    while group := [b for b in",
     ["tests/test_stream.py::test_batch_orders_cover_every_cell_once_a_pass_and_reads_give_each_process_its_share"]),
]


def occurrences(path: str, old: str) -> int:
    return (REPO / path).read_text().count(old)


def run_mutant(name: str, path: str, old: str, new: str, tests: list[str]) -> tuple[bool, float]:
    file = REPO / path
    original = file.read_text()
    if occurrences(path, old) != 1:
        raise SystemExit(f"{path}: the snippet for {name!r} occurs {occurrences(path, old)} times; update tests/mutants.py.")
    started = time.perf_counter()
    try:
        file.write_text(original.replace(old, new))
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO, capture_output=True, text=True)
    finally:
        file.write_text(original)
    return done.returncode != 0, time.perf_counter() - started


def main(argv: list[str]) -> int:
    wanted = argv[0] if argv else ""
    survivors = []
    for name, path, old, new, tests in MUTANTS:
        if wanted not in name:
            continue
        caught, seconds = run_mutant(name, path, old, new, tests)
        print(f"{'caught  ' if caught else 'SURVIVED'}  {name:<40} {path:<22} {seconds:5.0f} s", flush=True)
        if not caught:
            survivors.append(name)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
