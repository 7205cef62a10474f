"""Generate argparse flags from the frozen config dataclasses, so each parameter has one default.

A field ``av_align_min`` becomes ``--av-align-min``; booleans get ``--x/--no-x``; tuples are
comma-separated. ``from_args`` builds the dataclass back from the parsed namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


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
    return cls(**values)
