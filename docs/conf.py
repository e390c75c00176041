"""Sphinx configuration: the pages in docs/ (Markdown, through MyST) and the Python API from the numpydoc docstrings.

    make docs      # = sphinx-build -W -b html docs docs/_build/html (warnings fail the build)
"""

project = "scl"
author = "scl maintainers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]  # the verbatim benchmark tables start at any heading level
html_theme = "alabaster"
