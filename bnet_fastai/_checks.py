"""Argument checks shared by the public API: raise where a bad value enters, naming the valid choices."""
from __future__ import annotations

from collections.abc import Iterable


def check_choice(what: str, value: object, choices: Iterable[str]) -> None:
    """Raise `ValueError` unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, choices))}")


def check_kernel_size(k: object) -> None:
    """BNET's kernel must be a positive odd integer so that `padding=k//2` keeps the shape."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"k must be a positive odd integer (1, 3, 5, 7, ...), got {k!r}")


class DatasetError(ValueError):
    """A dataset cannot be had: unknown, unreachable, corrupt or incomplete. The message says the fix."""
