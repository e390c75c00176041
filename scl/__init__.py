"""scl: offline cell-type annotation with SCimilarity-format encoders, from Python.

    import scl
    scl.annotate(adata, "model.onnx")                    # obs scl_label, scl_confidence, ...; obsm X_scl
    result = scl.Annotator("model.onnx").annotate(X, genes=genes)   # numpy, scipy sparse, pandas
    ref = scl.Reference.build("atlas.h5ad", scl.Annotator("model.onnx"))   # annotate by nearest reference cells, search

Nothing here imports torch; onnxruntime is loaded when a model is opened. The command-line tools (scl-annotate,
scl-serve) run on the same pipeline (scl.runtime.pipeline). The API reference: docs/api.md (`make docs`).
"""

from importlib.metadata import PackageNotFoundError, version

from scl.runtime.annotator import Annotator, annotate
from scl.runtime.calls import COLUMNS, KNN_COLUMNS, VOTING_COLUMNS, Column
from scl.runtime.errors import GeneOverlapError, ModelError, SclError
from scl.runtime.lazy_result import LazyAnnotation
from scl.runtime.reference import Reference
from scl.runtime.result import AnnotationResult
from scl.runtime.voting import majority_vote, over_cluster

try:
    __version__ = version("scl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Annotator", "annotate", "AnnotationResult", "LazyAnnotation", "Reference", "majority_vote", "over_cluster", "COLUMNS", "KNN_COLUMNS", "VOTING_COLUMNS", "Column",
           "SclError", "ModelError", "GeneOverlapError", "__version__"]
