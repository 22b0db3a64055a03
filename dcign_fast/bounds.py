"""Ranges of numeric arguments, checked where a public entry point first receives them, so that a bad
value is refused with its name instead of failing later, deep inside torch or numpy; and what a refused value
was, for those messages."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # (typing has TypeGuard from Python 3.10 on; the annotation below is never evaluated)
    from typing import TypeGuard


# Options computed in float32 (the sampler's pull, odds of batch kinds) must stay below it.
FLOAT32_MAX = torch.finfo(torch.float32).max


def is_integer(value: object) -> TypeGuard[int]:
    """An integer, numpy's too (numbers.Integral), but not a bool. (Typed as int, which numpy's integers
    stand in for: typeshed's Integral has no comparison with an int.)"""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def described(value: object, dtype: bool = False) -> str:
    """What a refused value is, for an error message: a tensor's shape (and dtype, when asked), a dict's keys,
    another value's type."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}" + (f" {value.dtype}" if dtype else "")
    keys = f" with keys {sorted(map(str, value))}" if isinstance(value, dict) else ""
    return f"a {type(value).__name__}{keys}"


@dataclass(frozen=True)
class Bounds:
    """The values a numeric argument allows: from ``low`` (excluded when ``strict``) up to, not including,
    ``below``. Floats must also be finite."""

    low: float
    strict: bool = False
    below: float = math.inf

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # (math.isfinite of a huge int overflows)
            return False
        above_low = value > self.low if self.strict else value >= self.low
        return above_low and value < self.below

    def check(self, name: str, value: object, *, integer: bool = False) -> None:
        """Raise TypeError (not a number; not an integer when ``integer``) or ValueError (outside these
        bounds), naming ``name``. numpy scalars count as numbers; bools do not."""
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
        finite = "" if integer else " and finite"
        if not (integer or _fits_a_float(value)):
            raise ValueError(f"{name} must be {self}{finite}, got an int too large for a float")
        if not self.admits(value):  # type: ignore[arg-type]  # a Real compares like a float
            raise ValueError(f"{name} must be {self}{finite}, got {value!r}")

    def __str__(self) -> str:
        if self.below == math.inf:
            return f"{'>' if self.strict else '>='} {self.low}"
        return f"in {'(' if self.strict else '['}{self.low}, {self.below})"


def _fits_a_float(value: numbers.Real) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True
