"""Annotate one input file into one output file, streaming blocks of cells through the annotation core.

The file is read in the calling thread; blocks are annotated in parallel (annotator.py) and written in file
order, so memory stays bounded whatever the file size. Majority voting needs every cell's label (and, for the
automatic over-clustering, its embedding) before it can write its columns; those are kept, nothing else.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import voting
from .annotator import AnnotateOptions, Annotator, RunTally
from .atomic import atomic_path
from .calls import VOTING_COLUMNS, label_names
from .cli_errors import raise_if_stopped
from .errors import SclError
from .expression import ReadOptions
from .h5ad import H5adFile
from .outputs import CsvOutput, H5adOutput
from .places import Place, refuse_clashes
from .result import BlockCollector


@dataclass
class FileOptions:
    """What a file run writes beyond the calls."""

    probabilities: bool = False  # every class's probability
    majority_voting: bool = False  # votes over an automatic over-clustering (or over_clustering's clusters)
    over_clustering: str | None = None  # an obs column of the input .h5ad with clusters
    min_share: float = voting.MIN_SHARE

    def __post_init__(self):
        voting.check_min_share(self.min_share)  # before any cell is read, not after the last


def check_folder_writable(path: str, option: str) -> None:
    """Refuse an output whose folder is missing or read-only before any work is done."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise SclError(f"{folder}: the folder for {Path(path).name} does not exist; create it or choose another path.", option)
    if not os.access(folder, os.W_OK):
        raise SclError(f"{folder}: the folder for {Path(path).name} is not writable; choose another path.", option)


def check_output_path(input_path: str, output: str) -> None:
    refuse_clashes([Place(input_path, "the input")], [Place(output, "the output", "output")])
    check_folder_writable(output, "output")
    if not output.endswith((".csv", ".h5ad")):
        raise SclError(f"{output}: the output must end in .csv or .h5ad.", "output")


SLACK = 2**20  # metadata, the report and chunk rounding at the end of an output


def bytes_per_cell(annotator: Annotator, output: str, probabilities: bool) -> int:
    """What each cell adds to the output, generously."""
    classes, latent = len(annotator.classes), annotator.session.centroids.shape[1]
    if output.endswith(".csv"):
        return 120 + (10 * classes if probabilities else 0)
    return int(4 * (latent + (classes if probabilities else 0) + 12) * 1.3)


def copied_input(source) -> str | None:
    """The .h5ad an .h5ad output starts from: the input itself when it is one; other inputs start an empty file."""
    whole_file = isinstance(source.matrix, H5adFile) and source.matrix.is_hdf5 and source.matrix.positions is None
    return source.path if whole_file else None


def space_needed(source, annotator: Annotator, output: str, probabilities: bool) -> int:
    """Bytes the output will take: an .h5ad output copies an .h5ad input, then adds the results."""
    copied = copied_input(source)
    copied = 0 if output.endswith(".csv") or copied is None else os.path.getsize(copied)
    return copied + (source.n_cells or 0) * bytes_per_cell(annotator, output, probabilities) + SLACK


def check_space_left(folder: Path, cells_left: int, per_cell: int) -> None:
    """Stop before the disk fills, not after: libhdf5, once a write has failed for want of space, crashed the
    process when the file was closed (rc 139), so the disk is checked before each block is written."""
    needed = cells_left * per_cell + SLACK
    if shutil.disk_usage(folder).free < needed:
        raise disk_full(folder, needed)


def disk_full(folder: Path, needed: int) -> SclError:
    free = shutil.disk_usage(folder).free
    return SclError(f"{folder}: the disk is full ({free / 1e6:,.1f} MB free; this output needs about {needed / 1e6:,.1f} MB); "
                    "free some space or write the output elsewhere.", "output")


def annotate_file(input_path: str, output: str, annotator: Annotator, read: ReadOptions, options: AnnotateOptions,
                  file_options: FileOptions | None = None) -> dict:
    file_options = file_options or FileOptions()
    check_output_path(input_path, output)
    started = time.perf_counter()
    with annotator.open(input_path, read=read) as source:
        needed = space_needed(source, annotator, output, file_options.probabilities)
        if shutil.disk_usage(Path(output).parent).free < needed:
            raise disk_full(Path(output).parent, needed)
        try:
            with atomic_path(output, suffix=Path(output).suffix) as tmp:
                return write_annotations(source, tmp, input_path, output, annotator, options, file_options, started)
        except OSError as err:  # the disk filled while writing (another writer took the space)
            if err.errno == errno.ENOSPC or "No space left" in str(err):
                raise disk_full(Path(output).parent, needed) from None
            raise


def write_annotations(source, tmp: str, input_path: str, output: str, annotator: Annotator, options: AnnotateOptions,
                      file_options: FileOptions, started: float) -> dict:
    classes, columns = annotator.classes, annotator.columns(options)
    clusters = voting.given_clusters(file_options.over_clustering, None, source)
    voting_wanted = file_options.majority_voting or clusters is not None
    if output.endswith(".h5ad"):
        latent = annotator.session.centroids.shape[1]
        writer = H5adOutput(tmp, copied_input(source), classes, columns, latent, file_options.probabilities)
    else:
        writer = CsvOutput(tmp, classes, columns, file_options.probabilities)
    try:
        kept, tally = BlockCollector(source.n_cells), RunTally()
        bar = tqdm(total=source.n_cells, desc=Path(input_path).name, unit="cells", disable=not options.progress, leave=False)
        per_cell, folder = bytes_per_cell(annotator, output, file_options.probabilities), Path(output).parent
        for block in annotator.stream(source, options):
            raise_if_stopped()
            check_space_left(folder, (source.n_cells or tally.cells + len(block.cell_ids)) - tally.cells, per_cell)
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
    except BaseException:
        writer.abort()
        raise
    return report
