"""scl-annotate's driver: one input file into one output file through the pipeline, atomically, never over an input.

The file is read in the calling thread; blocks are annotated in parallel (pipeline.py) and written in file order,
so memory stays bounded whatever the file size. Majority voting needs every cell's label (and, for the automatic
over-clustering, its embedding) before it can write its columns; those are kept, nothing else.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from . import on_dask, voting
from .annotator import AnnotateOptions, Annotator
from .atomic import atomic_path
from .cli_errors import raise_if_stopped
from .errors import SclError
from .session import ENCODER_ONLY
from .expression import ReadOptions
from .h5ad import H5adFile
from .outputs import CsvOutput, H5adOutput
from .pipeline import Pipeline
from .places import Place, refuse_clashes
from .run_report import RunReport


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
    classes, latent = len(annotator.classes), annotator.session.latent
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


class FileSink:
    """A file writer (outputs.py) as the pipeline's sink: a block is written only while the run has not been stopped
    (SIGTERM, SIGHUP) and the disk has room for the rest of the output."""

    collector = None  # majority voting keeps what it needs in the pipeline

    def __init__(self, writer, output: str, n_cells: int | None, per_cell: int):
        self.writer, self.output, self.n_cells, self.per_cell = writer, output, n_cells, per_cell
        self.folder, self.written = Path(output).parent, 0

    def write(self, block) -> None:
        raise_if_stopped()
        n = len(block.cell_ids)
        check_space_left(self.folder, (self.n_cells or self.written + n) - self.written, self.per_cell)
        self.writer.write(block)
        self.written += n

    def add_columns(self, columns, values: dict) -> None:
        self.writer.add_columns(columns, values)

    def close(self, report) -> None:
        self.writer.close(report.to_dict())

    def abort(self) -> None:
        self.writer.abort()


def annotate_file(input_path: str, output: str, annotator: Annotator, read: ReadOptions, options: AnnotateOptions,
                  probabilities: bool = False, client=None, task_cells: int | None = None) -> RunReport:
    """Annotate one file into one output (.csv or .h5ad), written to a temporary file and renamed at the end.
    `client`: a dask.distributed Client whose workers read and annotate the file's cells, `task_cells` at a time
    (default on_dask.TASK_CELLS).

    Examples
    --------
    >>> report = annotate_file("pbmc.h5ad", "pbmc.scl.h5ad", Annotator("model.onnx"), ReadOptions(), AnnotateOptions())
    >>> report.labels
    """
    check_output_path(input_path, output)
    if probabilities and annotator.session.encoder_only:
        raise SclError(f"{annotator.session.path} {ENCODER_ONLY}: it has no class "
                       "probabilities to write; drop --probabilities.", "probabilities")
    started = time.perf_counter()
    with annotator.open(input_path, read=read) as source:
        needed = space_needed(source, annotator, output, probabilities)
        if shutil.disk_usage(Path(output).parent).free < needed:
            raise disk_full(Path(output).parent, needed)
        try:
            with atomic_path(output, suffix=Path(output).suffix) as tmp:
                clusters = voting.given_clusters(options.over_clustering, None, source)
                pipeline = Pipeline(annotator, options, source.alignment.matched)
                blocks = None if client is None else on_dask.file_blocks(client, annotator, source, options, task_cells)  # checked before writing
                writer = open_writer(tmp, output, source, annotator, pipeline.columns, probabilities)
                sink = FileSink(writer, output, source.n_cells, bytes_per_cell(annotator, output, probabilities))
                return pipeline.run(source, sink, clusters, desc=Path(input_path).name, started=started, blocks=blocks)
        except OSError as err:  # the disk filled while writing (another writer took the space)
            if err.errno == errno.ENOSPC or "No space left" in str(err):
                raise disk_full(Path(output).parent, needed) from None
            raise


def open_writer(tmp: str, output: str, source, annotator: Annotator, columns, probabilities: bool):
    """The writer for the output's format, writing into `tmp`."""
    if output.endswith(".h5ad"):
        return H5adOutput(tmp, copied_input(source), annotator.classes, columns, annotator.session.latent, probabilities)
    return CsvOutput(tmp, annotator.classes, columns, probabilities)
