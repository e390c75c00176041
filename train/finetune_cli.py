"""scl-train: not built yet (issue 3)."""

from scl.runtime.cli_errors import not_built_yet

main = not_built_yet("scl-train", "issue 3")
