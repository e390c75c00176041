"""scl-serve: not built yet (issue 6)."""

from scl.runtime.cli_errors import not_built_yet

main = not_built_yet("scl-serve", "issue 6")
