"""Checks of constructor arguments, shared by the whole package.

Each check returns the value it accepts and otherwise raises a ``ValueError`` that
names the argument, states the accepted values and repeats the value received.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite number in the accepted range.

    A ``bool`` is not a number here.

    Args:
        name: The argument's name, for the error message.
        value: The value received.
        low: The lower end of the range, or ``None`` for none.
        high: The upper end of the range, or ``None`` for none.
        low_open: Whether ``low`` itself is excluded.
        high_open: Whether ``high`` itself is excluded.

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: If ``value`` is not an ``int`` or ``float``, is not finite, or
            lies outside ``[low, high]`` (with the open ends excluded).
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    number = float(value) if ok else math.nan
    if ok and math.isfinite(number):
        if low is not None:
            ok = number > low if low_open else number >= low
        if ok and high is not None:
            ok = number < high if high_open else number <= high
    else:
        ok = False
    if not ok:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(
            f"`{name}` must be a finite number in {left}{lo}, {hi}{right}, got "
            f"{value!r}."
        )
    return number


def check_int(name: str, value: Any, *, low: int = 1) -> int:
    """Return ``value`` if it is an integer of at least ``low``.

    A ``bool`` is not an integer here.

    Args:
        name: The argument's name, for the error message.
        value: The value received.
        low: The smallest value accepted.

    Returns:
        ``value`` itself.

    Raises:
        ValueError: If ``value`` is not an ``int`` or is below ``low``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"`{name}` must be an integer of at least {low}, got {value!r}."
        )
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``.

    Args:
        name: The argument's name, for the error message.
        value: The value received.
        choices: The accepted values.

    Returns:
        ``value`` itself.

    Raises:
        ValueError: If ``value`` is not one of ``choices``.
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value
