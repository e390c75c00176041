"""Annotate one input file into one output file, streaming blocks of cells through the annotation core.

The file is read in the calling thread; blocks are annotated in parallel (annotator.py) and written in file
order, so memory stays bounded whatever the file size. Majority voting needs every cell's label (and, for the
automatic over-clustering, its embedding) before it can write its columns; those are kept, nothing else.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import voting
from .annotator import AnnotateOptions, Annotator, RunTally
from .atomic import atomic_path
from .calls import VOTING_COLUMNS, label_names
from .errors import SclError
from .expression import ReadOptions
from .outputs import CsvOutput, H5adOutput
from .result import BlockCollector
from .text_matrix import is_text_matrix


@dataclass
class FileOptions:
    """What a file run writes beyond the calls."""

    probabilities: bool = False  # every class's probability
    majority_voting: bool = False  # votes over an automatic over-clustering (or over_clustering's clusters)
    over_clustering: str | None = None  # an obs column of the input .h5ad with clusters
    min_share: float = voting.MIN_SHARE


def check_folder_writable(path: str, option: str) -> None:
    """Refuse an output whose folder is missing or read-only before any work is done."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise SclError(f"{folder}: the folder for {Path(path).name} does not exist; create it or choose another path.", option)
    if not os.access(folder, os.W_OK):
        raise SclError(f"{folder}: the folder for {Path(path).name} is not writable; choose another path.", option)


def check_output_path(input_path: str, output: str) -> None:
    out = Path(output)
    if out.exists() and os.path.samefile(input_path, out):
        raise SclError(f"{output}: the output would overwrite the input; choose another output.", "output")
    check_folder_writable(output, "output")
    if not output.endswith((".csv", ".h5ad")):
        raise SclError(f"{output}: the output must end in .csv or .h5ad.", "output")


def annotate_file(input_path: str, output: str, annotator: Annotator, read: ReadOptions, options: AnnotateOptions,
                  file_options: FileOptions | None = None) -> dict:
    file_options = file_options or FileOptions()
    check_output_path(input_path, output)
    started = time.perf_counter()
    classes, columns = annotator.classes, annotator.columns
    with annotator.open(input_path, read=read) as source, atomic_path(output, suffix=Path(output).suffix) as tmp:
        clusters = voting.given_clusters(file_options.over_clustering, None, source)
        voting_wanted = file_options.majority_voting or clusters is not None
        if output.endswith(".h5ad"):
            latent = annotator.session.centroids.shape[1]
            writer = H5adOutput(tmp, None if is_text_matrix(input_path) else input_path, classes, columns, latent, file_options.probabilities)
        else:
            writer = CsvOutput(tmp, classes, columns, file_options.probabilities)
        kept, tally = BlockCollector(source.n_cells), RunTally()
        bar = tqdm(total=source.n_cells, desc=Path(input_path).name, unit="cells", disable=not options.progress, leave=False)
        for block in annotator.stream(source, options):
            writer.write(block.cell_ids, block.calls, block.embedding, block.probabilities)
            tally.add(block, classes)
            if voting_wanted:
                kept.add({"label": block.calls["label"]} | ({"embedding": block.embedding} if clusters is None else {}))
            bar.update(len(block.cell_ids))
        bar.close()
        votes = None
        if voting_wanted:
            kept = kept.arrays()
            found = clusters if clusters is not None else voting.over_cluster(kept["embedding"])
            votes = voting.majority_vote(label_names(classes, kept["label"]), found, file_options.min_share)
            writer.add_columns(list(VOTING_COLUMNS), votes)
        extra = {"output": output}
        if votes is not None:
            extra["majority_voting"] = voting.summary(votes, file_options.over_clustering, file_options.min_share)
        report = annotator.report(source, options, tally, time.perf_counter() - started, **extra)
        writer.close(report)
    return report
