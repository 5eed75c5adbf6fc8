"""The ranges numbers given to fthss must lie in, named once and used everywhere: as argparse
types for command-line options, and to check request fields and configs read from files.

Integers are bounded above as well as below: a token count or id past 2**31 - 1 means nothing
to any model, and one past 2**63 overflows the tensors it ends up in, far from the field that
held it. Floats must be finite: `--lr nan` or `--temperature inf` would run and give nonsense.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from fthss.errors import ConfigError

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class IntRange:
    """Integers in [low, high]."""

    low: int
    high: int = INT32_MAX

    def describe(self, value=None) -> str:
        """What the range requires, naming the end `value` falls past (both if unknown)."""
        if isinstance(value, int) and value > self.high:
            return f"must be <= {self.high}"
        if isinstance(value, int) and not isinstance(value, bool) and value < self.low:
            return f"must be >= {self.low}"
        return f"must be an integer from {self.low} to {self.high}"

    def contains(self, value) -> bool:
        """An int (not a bool: `true` is no count) within the range."""
        return (isinstance(value, int) and not isinstance(value, bool)
                and self.low <= value <= self.high)

    def check(self, value, what: str, error: type[Exception] = ConfigError):
        """`value` if it is in range, else `error` naming `what` (a field, an option)."""
        if not self.contains(value):
            raise error(f"{what}: {self.describe(value)}, got {_short(value)}")
        return value

    def arg(self, text: str) -> int:
        """An argparse `type`: the option's text as an int in range."""
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"{self.describe(value)}, got {_short(value)}")
        return value


@dataclass(frozen=True)
class FloatRange:
    """Finite floats between low and high, each end open or closed."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def describe(self) -> str:
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        if math.isinf(self.high):
            return f"must be finite and {low}"
        return f"must be {low} and {'<' if self.high_open else '<='} {self.high:g}"

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        value = float(value)
        return (math.isfinite(value)
                and (value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high))

    def check(self, value, what: str, error: type[Exception] = ConfigError):
        """`value` if it is in range, else `error` naming `what`."""
        if not self.contains(value):
            raise error(f"{what}: {self.describe()}, got {_short(value)}")
        return value

    def arg(self, text: str) -> float:
        """An argparse `type`: the option's text as a float in range."""
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"{self.describe()}, got {value}")
        return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


COUNT = IntRange(1)  # at least one: batch sizes, token limits, steps
NON_NEGATIVE = IntRange(0)  # zero allowed: min_new_tokens, --save-every, --max-records
TOKEN_ID = IntRange(0)  # checked against the model's vocabulary where a model is known
SEED = IntRange(0, 2**32 - 1)  # what every RNG fthss seeds (torch, numpy, random) takes
POSITIVE = FloatRange(0.0, low_open=True)  # learning rate, epochs, gradient norm
NON_NEGATIVE_FLOAT = FloatRange(0.0)  # temperature
PROBABILITY = FloatRange(0.0, 1.0, low_open=True, high_open=False)  # top_p
FRACTION = FloatRange(0.0, 1.0)  # warmup ratio: [0, 1)
SHARE = FloatRange(0.0, 1.0, high_open=False)  # a share of a whole: [0, 1]
