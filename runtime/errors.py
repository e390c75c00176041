"""scl's one exception type: bad input from the user, with a message that names the problem and the fix.

Library callers catch `scl.SclError` (or ValueError, its base). Messages speak of settings by name, not by command-line
flag: `options` lists the settings that fix the problem, and each front end says them its own way (the CLI as
`--gene-column`, Python as `gene_column=`).
"""

from __future__ import annotations


class SclError(ValueError):
    """Bad input: the message names the problem and the fix, on one line.

    Examples
    --------
    >>> try:
    ...     scl.annotate(adata, "model.onnx")
    ... except scl.SclError as err:
    ...     print(err)
    """

    def __init__(self, message: str, *options: str):
        super().__init__(message)
        self.message = message
        self.options = options  # setting names in Python's spelling, e.g. "gene_column"

    def __str__(self) -> str:
        return self.with_options(str)

    def __reduce__(self):  # raised on a dask worker, it reaches the caller whole: message and options
        return self.__class__, (self.message, *self.options)

    def with_options(self, spell) -> str:
        """The message and the settings that fix it, each spelled by `spell` (the CLI's: name -> --flag-name)."""
        if not self.options:
            return self.message
        return f"{self.message} (see {', '.join(spell(o) for o in self.options)})"


class ModelError(SclError):
    """The model file is missing, unreadable or inconsistent.

    Examples
    --------
    >>> try:
    ...     scl.Annotator("old_or_broken.onnx")
    ... except scl.ModelError as err:
    ...     print(err)
    """


class GeneOverlapError(SclError):
    """Too few of the model's genes are in the input.

    Examples
    --------
    >>> try:
    ...     annotator.annotate(adata)
    ... except scl.GeneOverlapError:
    ...     annotator.annotate(adata, gene_column="gene_symbols")
    """
