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


def check_int(name: str, value: Any, *, low: int = 1, high: int | None = None) -> int:
    """Return ``value`` if it is an integer of at least ``low`` (and at most ``high``).

    A ``bool`` is not an integer here.

    Args:
        name: The argument's name, for the error message.
        value: The value received.
        low: The smallest value accepted.
        high: The largest value accepted, or ``None`` for none.

    Returns:
        ``value`` itself.

    Raises:
        ValueError: If ``value`` is not an ``int`` or lies outside ``[low, high]``.
    """
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        accepted = f"of at least {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an integer {accepted}, got {value!r}.")
    return value


#: The largest seed accepted: the seeds of NumPy and scikit-learn, and small enough
#: for the seeds derived from it (``seed * 1_000_003 + step``) to suit
#: ``torch.Generator.manual_seed``.
MAX_SEED = 2**32 - 1


def check_seed(name: str, value: Any) -> int:
    """Return ``value`` if it is an integer in ``[0, MAX_SEED]``.

    Args:
        name: The argument's name, for the error message.
        value: The value received.

    Returns:
        ``value`` itself.

    Raises:
        ValueError: If ``value`` is not an ``int`` in ``[0, 2**32 - 1]``.
    """
    return check_int(name, value, low=0, high=MAX_SEED)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False``.

    Only Python's ``bool`` is accepted: ``0``, ``1``, strings and ``None`` are not
    flags here.

    Args:
        name: The argument's name, for the error message.
        value: The value received.

    Returns:
        ``value`` itself.

    Raises:
        ValueError: If ``value`` is not a ``bool``.
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``.

    A value is one of the choices if it is a choice, or equal to one and of its
    type (so that a list or an array, say, is refused rather than compared).

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
    if not any(_same(value, choice) for choice in choices):
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def _same(value: Any, choice: Any) -> bool:
    """Whether ``value`` is ``choice``, or an equal value of its type."""
    if value is choice:
        return True
    return isinstance(value, type(choice)) and bool(value == choice)
