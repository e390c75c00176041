"""scl-export: not built yet (issue 4)."""

from scl.runtime.cli_errors import not_built_yet

main = not_built_yet("scl-export", "issue 4")
