"""Where a run reads and writes, checked together before any work: no output may land on an input, the model or
another output.

Two paths are one place when they resolve to the same file (symbolic links followed) or, where both exist, are
the same inode (hard links). Every command that writes files (scl-annotate, scl-export) names its reads and writes
here once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SclError


@dataclass(frozen=True)
class Place:
    path: str
    role: str  # what it is, in words: "input", "the model", "the report", ...
    option: str = ""  # the setting that names it, for the error's "(see ...)"


def same_place(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def refuse_clashes(reads: list[Place], writes: list[Place]) -> None:
    """One line naming both places when a write would replace something read or another write."""
    for i, out in enumerate(writes):
        for other in reads + writes[:i]:
            if same_place(out.path, other.path):
                raise SclError(f"{out.role} ({out.path}) would replace {other.role} ({other.path}); choose another path for {out.role}.",
                               *dict.fromkeys(o for o in (out.option, other.option) if o))


def is_inside(path: str, folder: str) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except ValueError:
        return False
