"""An scl model ready to annotate: `Annotator` (the model, its options checked against it, reading any input) and
`scl.annotate` (AnnData in place or on a copy, scanpy-style).

`Annotator.annotate` is the in-memory driver over pipeline.py, as file_driver.py is the files' and serve.py the server's.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from . import on_dask, voting
from .bounds import AT_LEAST_ONE, ERROR_RATE, NOT_NEGATIVE_WHOLE, PROBABILITY, SHARE_OF_CELLS, Bounds, check_bounds, check_setting
from .calls import NOVELTY_ALPHA, CallRules, columns_for, default_min_cell_genes, kept_labels
from .errors import SclError
from .expression import ExpressionSource, ReadOptions
from .h5ad import wanted_matrix
from .in_memory import MemoryMatrix, is_anndata, memory_matrix
from .pipeline import Pipeline
from .reference import DEFAULT_K, as_reference
from .result import AnnotationResult, ResultSink, check_key_added
from .session import ENCODER_ONLY, AnnotationSession, Prediction

log = logging.getLogger("scl")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class AnnotateOptions:
    """How cells are called, whatever they come from: built once per run and passed down (the report echoes them)."""

    min_confidence: float = 0.0  # cells below are 'unassigned'
    max_novelty: str | float | None = None  # "auto": the model's per-class limits; a number: one limit for all; None: count only
    progress: bool = True
    min_cell_genes: int | None = None  # cells expressing fewer of the model's genes are 'unassigned'; None: calls.default_min_cell_genes
    alpha: float | None = None  # prediction sets holding the true type for >= 1 - alpha of cells like the calibration cells; novel: p <= alpha
    majority_voting: bool = False  # votes over an automatic over-clustering (or over_clustering's clusters)
    over_clustering: object = None  # clusters to vote in: an obs column name, or one cluster id per cell
    min_share: float = voting.MIN_SHARE  # clusters whose top label holds less are 'heterogeneous'
    reference: object = None  # a Reference (or its folder's path): also call each cell by its k nearest reference cells
    k: int = DEFAULT_K  # reference cells that vote
    restrict_to: object = None  # label names (a list, or "A,B"): the head and the neighbours call only these
    exclude: object = None  # label names the head and the neighbours never call

    BOUNDS: ClassVar[dict[str, Bounds]] = {"min_confidence": PROBABILITY, "min_cell_genes": NOT_NEGATIVE_WHOLE, "alpha": ERROR_RATE,
                                           "min_share": SHARE_OF_CELLS, "k": AT_LEAST_ONE}

    def __post_init__(self):
        check_bounds(self, self.BOUNDS)
        self.restrict_to, self.exclude = label_list(self.restrict_to, "restrict_to"), label_list(self.exclude, "exclude")
        if self.restrict_to is not None and self.exclude is not None:
            raise SclError("restrict_to and exclude: give one of them (the labels to keep, or those to leave out).", "exclude")
        if self.min_share != voting.MIN_SHARE and not self.voting_wanted:
            log.warning(f"min_share {self.min_share:g} is ignored: it applies to majority voting, which was not asked for (majority_voting, over_clustering).")

    @property
    def voting_wanted(self) -> bool:
        return self.majority_voting or self.over_clustering is not None


def label_list(names, option: str) -> tuple[str, ...] | None:
    """Label names as given: a list (or other sequence) of names, or one string with commas between them."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    try:
        names = tuple(str(n) for n in names)
    except TypeError:
        raise SclError(f"{option} {names!r}: give label names, as a list or one string with commas between them.", option) from None
    if not names:
        raise SclError(f"{option}: no label names given.", option)
    return names


class Annotator:
    """An scl model (.onnx from scl-export) ready to annotate cells, with onnxruntime alone.

    Parameters
    ----------
    model
        Path of the .onnx file.
    device
        "auto" (CUDA where onnxruntime-gpu really loads it, else the CPU), "cuda" or "cpu".
    threads
        Blocks of cells annotated at once, each on one core; default: every core.
    session_threads
        onnxruntime threads per run. 1 (default) suits parallel blocks; a service that runs one micro-batch at a
        time (scl-serve) gives it every core instead.

    Examples
    --------
    >>> import scl
    >>> annotator = scl.Annotator("model.onnx")
    >>> result = annotator.annotate(adata)          # AnnData, numpy, scipy sparse or pandas
    >>> result.predicted_labels[:3]
    array(['B', 'NK', 'CD4TN'], dtype=object)
    >>> annotator.classes
    ['B', 'CD4TCM', 'CD4TN', 'CD4Treg', 'CD8TN', 'Monocyte', 'NK']
    """

    def __init__(self, model, device: str = "auto", threads: int | None = None, *, session_threads: int = 1):
        self.session = AnnotationSession(str(model), device, threads=session_threads)  # parallel one-thread runs: see the module docstring
        for note in self.session.notes:
            log.warning(note)
        check_setting("threads", threads, AT_LEAST_ONE, None)
        cuda = self.session.provider == "CUDAExecutionProvider"
        self.workers = 2 if cuda else threads or available_cores()  # on CUDA: prepare one block while the GPU runs another

    @property
    def classes(self) -> list[str]:
        """The cell types the model calls, in the order of its probability columns."""
        return list(self.session.classes)

    @property
    def gene_order(self) -> list[str]:
        """The model's genes, in the order it reads them."""
        return self.session.gene_order.genes.tolist()

    @property
    def model_card(self) -> dict:
        """What the model says about itself: base model, training data digests, metrics."""
        return dict(self.session.meta["model_card"])

    def columns(self, options: AnnotateOptions | None = None) -> list:
        """The per-cell output columns (calls.COLUMNS) this model gives with these options: 'novelty_p' for calibrated
        models, 'novel' with a calibration or novelty limits, 'prediction_set' and 'set_size' with an alpha."""
        return columns_for(self.rules(options or AnnotateOptions()))

    def rules(self, options: AnnotateOptions, genes_shown: int | None = None) -> CallRules:
        """The options checked against this model, as call_cells takes them. `genes_shown`: how many of the model's
        genes the input holds (what min_cell_genes scales with); None: all of them (a request's gene map shows only
        the genes a cell expresses, so it cannot say)."""
        session, alpha = self.session, options.alpha
        shown = len(session.gene_order) if genes_shown is None else genes_shown
        min_genes = default_min_cell_genes(shown) if options.min_cell_genes is None else options.min_cell_genes
        if session.encoder_only:
            self.refuse_head_options(options)
            return CallRules(novelty_alpha=float(alpha) if alpha is not None else NOVELTY_ALPHA, min_cell_genes=min_genes)
        kept = kept_labels(session.classes, options.restrict_to, options.exclude, f"the model {session.path}")
        if alpha is not None:
            alpha = float(alpha)  # a Fraction or numpy float, as one float for the arithmetic and the report
            if session.calibration is None:
                card = session.meta.get("model_card", {})
                raise SclError(f"{session.path}: this model carries no calibration cells (exported by scl {card.get('scl_version', '?')} on "
                               f"{str(card.get('created', '?'))[:10]} from a run without calibration.json); prediction sets and novelty "
                               "p-values need them: train and export it again with this scl.", "alpha")
        limits, unassign = self._novelty_limits(options.max_novelty)
        return CallRules(options.min_confidence, limits, session.calibration, alpha or NOVELTY_ALPHA, alpha, unassign, min_genes, kept)

    def refuse_head_options(self, options: AnnotateOptions) -> None:
        """An encoder-only model calls cells by a reference's neighbours alone: what needs a head is refused in one line."""
        asked = [name for name, given in (("min_confidence", options.min_confidence > 0), ("max_novelty", options.max_novelty is not None),
                                          ("majority_voting", options.voting_wanted)) if given]
        if asked:
            raise SclError(f"{self.session.path} {ENCODER_ONLY}: {asked[0]} needs a head; "
                           "drop it, or train a head with scl-train and export the run.", asked[0])

    def _novelty_limits(self, max_novelty: str | float | None) -> tuple[np.ndarray | None, bool]:
        """(per-class distance limits, whether novel cells are labelled unassigned); calibrated models judge novelty by
        p-value, so they need no limits unless the user gives one distance."""
        session = self.session
        if max_novelty is None:
            return session.novelty_limits, False
        if max_novelty == "auto":
            if session.novelty_limits is None and session.calibration is None:
                raise SclError(f"{session.path}: this model carries no novelty limits (exported before scl stored them); "
                               "export it again, or give max_novelty a cosine distance such as 0.5.", "max_novelty")
            return session.novelty_limits, True
        try:
            limit = float(max_novelty)
        except (TypeError, ValueError):
            limit = float("nan")
        if not 0 <= limit <= 2:  # nan fails too
            raise SclError(f"max_novelty {max_novelty!r}: give auto (the model's per-class limits) or a cosine distance between 0 and 2.", "max_novelty")
        return np.full(len(session.classes), limit, np.float32), True

    def open(self, data, genes=None, cell_ids=None, read: ReadOptions | None = None, layer=None, use_raw=None) -> ExpressionSource:
        """Cells from a file path or any in-memory object, aligned to the model's genes."""
        read = read or ReadOptions()
        if isinstance(data, (str, os.PathLike, MemoryMatrix)):  # a MemoryMatrix: cells the caller named (the server's requests)
            return ExpressionSource(data, self.session.gene_order, read)
        if is_anndata(data) and data.isbacked:  # read from its file, block by block, like scl-annotate
            return self._open_backed(data, read, layer, use_raw)
        return ExpressionSource(memory_matrix(data, genes, cell_ids, layer, use_raw), self.session.gene_order, read)

    def _open_backed(self, adata, read: ReadOptions, layer, use_raw) -> ExpressionSource:
        """A backed AnnData (or a view of one: its cells, in its order) read from its file."""
        matrix = wanted_matrix(layer, use_raw)
        cells = np.asarray(adata.obs_names, dtype=str) if adata.is_view else None
        source = ExpressionSource(str(adata.filename), self.session.gene_order, replace(read, matrix=matrix, cell_names=cells))
        if adata.is_view and source.matrix_name != "raw/X" and len(source.gene_symbols) != adata.n_vars:
            source.close()
            raise SclError(f"{adata.filename}: this backed view keeps {adata.n_vars:,} of the file's {len(source.gene_symbols):,} genes, and scl "
                           "reads whole cells from the file: annotate a view of cells only (adata[cells]), or load it with .to_memory().")
        return source

    def predict(self, rows: np.ndarray) -> Prediction:
        return self.session.predict(rows, is_lognorm=True)  # normalised on their nonzeros by the pipeline, not densely in the graph

    def stream(self, source: ExpressionSource, options: AnnotateOptions | None = None):
        """AnnotatedBlock per block of `source`, in order, with at most threads + 1 blocks in memory.

        Examples
        --------
        >>> source = annotator.open("big.h5ad")
        >>> for block in annotator.stream(source):
        ...     print(block.cell_ids[0], block.calls["label"][0])
        """
        return Pipeline(self, options or AnnotateOptions(), source.alignment.matched).blocks(source)

    def annotate(self, data, genes=None, cell_ids=None, *, layer: str | None = None, use_raw: bool | None = None,
                 gene_column: str | None = None, input_kind: str = "auto", min_genes: int | None = None,
                 min_confidence: float = 0.0, max_novelty: str | float | None = None, min_cell_genes: int | None = None,
                 alpha: float | None = None, majority_voting: bool = False, over_clustering=None, min_share: float = voting.MIN_SHARE,
                 reference=None, k: int = DEFAULT_K, restrict_to=None, exclude=None, batch_size: int = 256, progress: bool = True,
                 lazy: bool = False) -> AnnotationResult:
        """Annotate cells in memory (or an .h5ad/CSV path) and return the calls, embedding and probabilities.

        Parameters
        ----------
        data
            AnnData (counts found as scl-annotate finds them: layers['counts'], else raw, else X), numpy array,
            scipy sparse matrix (CSR is read in place; others are converted once), dask array (CSR or dense row
            chunks, as `anndata.experimental.read_lazy` gives) or pandas DataFrame, cells as rows. Backed AnnData is
            read from its file block by block; a dask array one row chunk at a time, or, with a dask.distributed
            `Client` active, each chunk annotated on the cluster's workers (results gathered here, in order).
        genes, cell_ids
            Gene names (symbols or Ensembl IDs) and cell ids for a bare matrix.
        layer, use_raw
            Which AnnData matrix holds the counts, as in scanpy.
        gene_column
            A var column with symbols or Ensembl IDs, where the index holds something else.
        input_kind
            "auto" (judged on the first block, checked on every block), "counts" or "lognorm" (log1p of counts per 1e4).
        min_genes
            Fewest model genes the input must have; default SCimilarity's 5,000 of 28,231, scaled to the model.
        min_confidence
            Cells below this probability are labelled 'unassigned'.
        min_cell_genes
            Cells expressing fewer of the model's genes are labelled 'unassigned' (default 200 of 28,231, the same share
            of smaller gene orders: see the `genes_detected` column).
        max_novelty
            "auto" labels novel cells 'unassigned' (calibrated models: novelty p <= alpha, 0.01 unless `alpha` is given;
            older models: beyond their label's limit); a number is one cosine-distance limit for every class; None
            counts novel cells only.
        alpha
            The error rate you accept (calibrated models): each cell gets a prediction set that holds its true type
            for at least 1 - alpha of cells like the model's calibration cells (columns prediction_set, set_size); a
            cell whose set is empty is 'unassigned'. It also sets the novelty level (novel: novelty p <= alpha).
        majority_voting, over_clustering, min_share
            Majority voting (see `scl.majority_vote`): clusters from `over_clustering` (an obs column name or one
            cluster id per cell), or from an automatic over-clustering of the embedding when only
            `majority_voting=True`. Clusters whose top label holds less than `min_share` are 'heterogeneous'.
        reference, k
            A `Reference` (or the path of its folder, from scl-reference build) built with this model: each cell is also
            called by its k nearest reference cells (columns knn_label, knn_share, knn_second_label, knn_min_dist,
            knn_novelty_p, knn_novel, knn_agrees).
        restrict_to, exclude
            Label names (a list, or one string with commas) that the head and the neighbours may call, or may not
            (SCimilarity's safelist and blocklist). The head's probabilities are renormalised over the kept classes and
            its prediction sets keep only them; only reference cells of kept labels vote. Every name must be a label of
            the model (and of the reference, when one is given).
        batch_size
            Cells per block; memory is threads x batch_size x model genes x 4 bytes.
        lazy
            With dask-backed data: return a `LazyAnnotation` at once, whose embedding, probabilities and call columns
            are dask arrays (one task per row chunk, run when computed; see runtime/lazy_result.py), for atlases
            whose results do not fit in this process.

        Returns
        -------
        AnnotationResult (a LazyAnnotation with lazy=True)

        Examples
        --------
        >>> result = annotator.annotate(adata, majority_voting=True)
        >>> result.to_frame().head()
        >>> result.embedding.shape
        (2800, 128)
        """
        asked = {k: v for k, v in locals().items() if k not in ("self", "lazy")}
        options = AnnotateOptions(min_confidence, max_novelty, progress, min_cell_genes, alpha, majority_voting, over_clustering, min_share,
                                  as_reference(reference), k, restrict_to, exclude)
        read = ReadOptions(gene_column=gene_column, input_kind=input_kind, min_genes=min_genes, batch_size=batch_size)
        started = time.perf_counter()
        if lazy:
            from .lazy_result import lazy_annotation

            with self.open(data, genes, cell_ids, read, layer, use_raw) as source:
                return lazy_annotation(self, source, options, eager=lambda: self.annotate(**asked))
        with self.open(data, genes, cell_ids, read, layer, use_raw) as source:
            clusters = voting.given_clusters(over_clustering, data, source)
            pipeline = Pipeline(self, options, source.alignment.matched)
            sink = ResultSink(source.n_cells, self.classes, pipeline.columns)
            client = on_dask.active_client() if getattr(source.matrix, "is_dask", False) else None
            blocks = None if client is None else on_dask.array_blocks(client, self, source, options)  # each row chunk on the cluster
            pipeline.run(source, sink, clusters, started=started, blocks=blocks)
        return sink.result

    def embed(self, data, genes=None, cell_ids=None, *, layer: str | None = None, use_raw: bool | None = None, gene_column: str | None = None,
              input_kind: str = "auto", min_genes: int | None = None, batch_size: int = 256, progress: bool = True) -> np.ndarray:
        """The L2-normalised embedding [cells, latent] (takes annotate()'s reading options); any model, encoder-only too.

        Examples
        --------
        >>> adata.obsm["X_scl"] = annotator.embed(adata)
        >>> sc.pp.neighbors(adata, use_rep="X_scl")
        """
        read = ReadOptions(gene_column=gene_column, input_kind=input_kind, min_genes=min_genes, batch_size=batch_size)
        with self.open(data, genes, cell_ids, read, layer, use_raw) as source:
            pipeline = Pipeline(self, AnnotateOptions(progress=False), source.alignment.matched)
            parts = []
            with tqdm(total=source.n_cells, desc="scl embed", unit="cells", disable=not progress, leave=False) as bar:
                for block in pipeline.blocks(source):
                    parts.append(block.embedding)
                    bar.update(len(block.cell_ids))
        return np.concatenate(parts)

    def describe(self) -> dict:
        return self.session.describe() | {"notes": self.session.notes}


def annotate(adata, model, *, layer: str | None = None, use_raw: bool | None = None, key_added: str = "scl", copy: bool = False,
             device: str = "auto", threads: int | None = None, **options):
    """Annotate an AnnData in place (or a copy), scanpy-style: what scl-annotate writes to .h5ad files.

    Writes obs `{key_added}_label`, `_confidence`, `_second_label`, `_second_probability`, `_novelty` (and `_novel`
    for models with novelty limits; `_cluster`, `_majority_label`, `_majority_share` with majority voting),
    obsm `X_{key_added}` (the embedding) and `{key_added}_probabilities`, and uns[key_added] (the run's report).

    Parameters
    ----------
    adata
        AnnData with counts (or log1p(CP10k)) of cells x genes; gene symbols or Ensembl IDs in var.
    model
        Path of the .onnx from scl-export, or an `Annotator` (reuse one to annotate many objects).
    layer, use_raw
        Where the counts are. By default, as scl-annotate reads files: layers['counts'], else raw, else X.
    key_added
        Prefix of the obs, obsm and uns keys.
    copy
        Annotate a copy and return it, leaving `adata` untouched; otherwise annotate `adata` and return None.
    device, threads
        See `Annotator`.
    **options
        Any option of `Annotator.annotate`: min_confidence, max_novelty, alpha, majority_voting, over_clustering, min_share,
        gene_column, input_kind, min_genes, batch_size, progress.

    Examples
    --------
    >>> import scl
    >>> scl.annotate(adata, "model.onnx", over_clustering="leiden")
    >>> adata.obs[["scl_label", "scl_confidence", "scl_majority_label"]].head()
    >>> sc.pp.neighbors(adata, use_rep="X_scl")
    """
    if not is_anndata(adata):
        raise SclError(f"scl.annotate takes an AnnData, not a {type(adata).__name__}; for matrices and DataFrames use "
                       "scl.Annotator(model).annotate(X, genes=...).")
    check_key_added(key_added)
    refuse_backed_copy(adata, copy)
    annotator = model if isinstance(model, Annotator) else Annotator(model, device, threads)
    target = adata.copy() if copy else adata
    result = annotator.annotate(target, layer=layer, use_raw=use_raw, **options)
    result.to_adata(target, key_added)
    return target if copy else None


def refuse_backed_copy(adata, copy: bool) -> None:
    """anndata copies a backed object (or turns a backed view into one, as writing its obs does) only into a new file."""
    if adata.isbacked and (copy or adata.is_view):
        what = "copy=True on a backed AnnData" if copy else "a view of a backed AnnData"
        raise SclError(f"scl.annotate with {what}: anndata cannot copy backed data without a file, and writing results into a view copies it; "
                       "use scl.Annotator(model).annotate(adata) for a result object (result.to_frame()), or adata.to_memory() first.")

