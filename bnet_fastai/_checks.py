"""Argument checks shared by the public API: raise where a bad value enters, naming the valid choices."""
from __future__ import annotations

import ast
import importlib
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from bnet_fastai import names


def check_choice(what: str, value: object, choices: Iterable[str]) -> None:
    """Raise `ValueError` unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, choices))}")


def check_kernel_size(k: object) -> None:
    """BNET's kernel must be a positive odd integer so that `padding=k//2` keeps the shape."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"k must be a positive odd integer (1, 3, 5, 7, ...), got {k!r}")


def check_type(fn: str, what: str, value: object, kind: type | tuple[type, ...], hint: str) -> None:
    """Raise `TypeError` in one line unless `value` is a `kind`: names the function, the argument and what to pass.
    (A bool is not taken for an int.)"""
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                 else (kind,))):
        shown = repr(value).splitlines()[0][:60] if repr(value) else ""
        raise TypeError(f"{fn} takes {what}, got {type(value).__name__} {shown}; {hint}")


def is_timm_arch(arch: object) -> bool:
    """Whether `arch` is not one of the project's names but a timm model name (imports timm, so torch: only for a
    name the project does not know)."""
    if not isinstance(arch, str) or arch in names.ARCHS:
        return False
    import timm

    return timm.is_model(arch)


def check_arch(arch: object) -> None:
    """ValueError unless `arch` is one of the project's names or any timm model name."""
    if arch not in names.ARCHS and not is_timm_arch(arch):
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(names.ARCHS)}, or any timm model name "
                         f"(timm.list_models(): resnet18, efficientnet_b0, convnext_atto ...)")


def check_model_args(arch: str, norm: str, placement: str, k: int, act: str, bnet_init: str) -> None:
    """Raise ValueError naming the valid choices for any bad `create_model` argument."""
    check_arch(arch)
    check_choice("norm", norm, names.NORMS)
    check_choice("placement", placement, names.PLACEMENTS)
    check_kernel_size(k)
    check_choice("act", act, names.ACTIVATIONS)
    check_choice("bnet_init", bnet_init, names.SWAP_INITS)
    if act != names.ACTIVATIONS[0] and arch not in names.ARCHS:
        raise ValueError(f"act applies to the project's archs; timm's {arch} keeps its own activation: leave act "
                         f"at its default ({names.ACTIVATIONS[0]})")


def check_block_args(arch: str, sa: bool = False, pool: str = "avg", size: int | None = None) -> None:
    """Raise ValueError unless `sa` and `pool` are valid for `arch` (they exist in the xresnet family only)
    and, for ``pool="maxblur"``, for the image `size`."""
    check_choice("pool", pool, names.POOLS)
    if (sa or pool != "avg") and arch not in names.FASTAI_ARCHS:
        raise ValueError(f"sa and pool apply to fastai's xresnet family only; {arch!r} is timm's: "
                         f"use sa=False, pool='avg'")
    # kornia's MaxBlurPool2D rounds an odd map down where the block's strided conv rounds it up, so the
    # residual sum of a downsampling block needs even maps there: sizes that are multiples of 32 give them.
    if pool == "maxblur" and size is not None and size % 32:
        raise ValueError(f"pool='maxblur' needs an image size that is a multiple of 32 (64, 128, 160, ...), "
                         f"got {size}")


def check_output_folder(out: str | os.PathLike) -> Path:
    """`out` resolved, if it is (or can be made as) a folder this process can write; else ValueError.

    Nothing is created: the nearest existing folder on the way is tested with a temporary file that is
    removed at once, so a rejected `out` leaves the disk as it was.
    """
    try:
        path = Path(out).expanduser().resolve()
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as e:  # a folder name longer than the file system allows (ENAMETOOLONG), ...
        raise ValueError(f"output folder {str(out)!r} cannot be used ({e.strerror or e}); give another folder "
                         f"path (--out)") from None
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
        raise ValueError(f"output folder {str(out)!r} {where}; give a folder path (--out)")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(f"output folder {str(out)!r} cannot be written ({e.strerror or e} in {existing}); "
                         f"give a folder you can write (--out)") from None
    return path


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


def require(module: str, extra: str, what: str, package: str | None = None):
    """Import `module` of an optional part of the package, or raise ValueError in one line naming the extra to
    install (``pip install 'bnet-fastai[EXTRA]'``) for `what` needs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        name = package or module.partition(".")[0]
        raise ValueError(f"{what} needs {name}, which is not installed: pip install 'bnet-fastai[{extra}]' "
                         f"(from a checkout: pip install '.[{extra}]')") from None
