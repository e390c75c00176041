"""The values a setting may take (numbers within bounds, names from a declared list), checked when its options dataclass is made: one line naming the setting,
what it may be and its default, for the command line (which spells it as the flag) and Python alike."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from .errors import SclError


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting may take: finite, between low and high (each included unless open)."""

    low: float
    high: float = math.inf
    whole: bool = False
    low_open: bool = False
    high_open: bool = False
    words: str | None = None  # what the refusal says may be given, where "a number in [0, 1]" would say less

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.whole else numbers.Real) or not math.isfinite(value):
            return False  # nan and infinities too
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.words:
            return self.words
        if self.whole:
            return f"a whole number, {self.low:.0f} or more" if self.high == math.inf else f"a whole number from {self.low:.0f} to {self.high:.0f}"
        if self.high == math.inf:
            return f"a number {'above' if self.low_open else 'from'} {self.low:g}" + ("" if self.low_open else " up")
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


SEED = Bounds(0, 2**32 - 1, whole=True)
POSITIVE = Bounds(0, low_open=True)
NOT_NEGATIVE = Bounds(0)
AT_LEAST_ONE = Bounds(1, whole=True)
SHARE = Bounds(0, 1, low_open=True, high_open=True)
PROBABILITY = Bounds(0, 1)
NOT_NEGATIVE_WHOLE = Bounds(0, whole=True)
SHARE_OF_CELLS = Bounds(0, 1, words="a share between 0 and 1")
ERROR_RATE = Bounds(0, 1, low_open=True, high_open=True, words="the error rate you accept, between 0 and 1 (such as 0.05 or 0.1)")


def check_bounds(options, bounds: dict[str, Bounds]) -> None:
    """One line naming the first setting of a dataclass out of its bounds, what it may be and its default.
    A setting whose default is None may be None."""
    defaults = {f.name: f.default for f in fields(options)}
    for name, allowed in bounds.items():
        check_setting(name, getattr(options, name), allowed, defaults[name])


def check_setting(name: str, value, allowed: Bounds, default) -> None:
    """One line when a setting is out of its bounds: its name, what it may be and its default (None: may be None)."""
    if not (value is None and default is None) and not allowed.holds(value):
        default = "or None (the default)" if default is None else f"such as {default!r} (the default)"
        raise SclError(f"{name} {value!r}: give {allowed.describe()}, {default}.", name)


def check_choice(options, name: str, choices: tuple[str, ...]) -> None:
    """One line when a setting named from a list (input_kind) holds anything else, in Python as on the command line."""
    value = getattr(options, name)
    if not isinstance(value, str) or value not in choices:
        raise SclError(f"{name} {value!r}: give one of {', '.join(choices)} (exactly so, in lower case).", name)
