"""Argument checks shared by the public API: raise where a bad value enters, naming the valid choices."""
from __future__ import annotations

import ast
import math
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


def parse_parameter(name: str, value: object, kind: type, many: bool = False) -> object:
    """A notebook parameter as a user or papermill gives it, checked and converted to `kind`.

    papermill's ``-p SEEDS '[0, 1]'`` passes the string ``"[0, 1]"``: with `many`, a Python/JSON list, a
    comma-separated string or a single value all become a list. `None` stays `None` ("the profile's value").
    A value that cannot be read raises ValueError in one line naming the parameter and what it takes.
    """
    if value is None:
        return None
    if many and isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "(")):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"{name}={value!r} is not a list: write e.g. [0, 1] or 0,1") from None
        else:
            value = [v.strip() for v in text.split(",") if v.strip()]
    items = list(value) if many and isinstance(value, (list, tuple)) else [value]
    converted = [_convert(name, v, kind) for v in items]
    if many and not converted:
        raise ValueError(f"{name} is an empty list: give at least one value")
    return converted if many else converted[0]


def _convert(name: str, value: object, kind: type) -> object:
    what = {int: "whole numbers", float: "numbers", str: "names", bool: "True or False"}[kind]
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise ValueError(f"{name} takes {what}, got {value!r}") from None
