"""Generate argparse flags from the frozen config dataclasses, so each parameter has one default.

A field ``av_align_min`` becomes ``--av-align-min``; booleans get ``--x/--no-x``; tuples are
comma-separated. ``from_args`` builds the dataclass back from the parsed namespace and turns a
value the dataclass refuses (its ``__post_init__`` checks) into a :class:`FlagError` that names the
flag: CLIs print it as one line and exit with code 2, before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config field holds a value outside its range; ``field`` names it (for the flag name)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class FlagError(ValueError):
    """A command-line flag with a refused value; the message starts with the flag."""


def check_finite(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """``value`` is a finite number within ``[lo, hi]`` (NaN and infinities never pass)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise ConfigError(name, f"must be >= {lo:g}" + (f" and <= {hi:g}" if hi is not None else "") + f", got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(name, (f"must be >= {lo:g} and " if lo is not None else "must be ") + f"<= {hi:g}, got {value!r}")


def check_positive(name: str, value: float) -> None:
    """A finite number > 0 (time limits, durations that divide)."""
    check_finite(name, value)
    if value <= 0:
        raise ConfigError(name, f"must be > 0, got {value!r}")


def check_count(name: str, value: int, minimum: int = 0) -> None:
    """A whole number >= ``minimum`` (counts: 0; batch sizes: 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be a whole number >= {minimum}, got {value!r}")


def _flag(name: str, prefix: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def _dest(name: str, prefix: str) -> str:
    return (prefix + name).replace("-", "_")


def _parse_tuple(elem_type: type):
    def parse(text: str) -> tuple:
        return tuple(elem_type(x) for x in text.split(",") if x.strip())
    return parse


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str = "",
                    skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": _dest(f.name, prefix), "default": default}
        origin = typing.get_origin(typ)
        args = typing.get_args(typ)
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            kwargs["type"] = _parse_tuple(args[0] if args else str)
            kwargs["metavar"] = "A,B,..."
        elif origin is typing.Literal:
            kwargs["choices"] = list(args)
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            inner = [a for a in args if a is not type(None)]
            kwargs["type"] = inner[0] if inner else str
        else:
            kwargs["type"] = typ
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        kwargs["help"] = f"{help_text} (default: {default})"
        parser.add_argument(_flag(f.name, prefix), **kwargs)


def from_args(cls: type[T], ns: argparse.Namespace, prefix: str = "", **overrides: Any) -> T:
    values = {}
    for f in dataclasses.fields(cls):
        dest = _dest(f.name, prefix)
        if f.init and hasattr(ns, dest):
            values[f.name] = getattr(ns, dest)
    values.update(overrides)
    try:
        return cls(**values)
    except ConfigError as e:
        raise FlagError(f"{_flag(e.field, prefix)}: {e}") from e
    except ValueError as e:
        if type(e) is not ValueError:  # a typed error (e.g. AugmentConfigError) is the caller's to report
            raise
        raise FlagError(f"invalid {cls.__name__} settings: {e}") from e
