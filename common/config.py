"""Strict config files: TOML (plus ``section.field=value`` overrides) read into typed, frozen
dataclasses, recursively, every error naming its key, unknown keys refused. The one parser of the
project: run configs (``trainer.config``), pipeline settings, experiment protocols and the feature
spec (``data.spec``) all go through :func:`from_dict`. No torch: a config answers ``--help`` and
its errors before TorchRec loads."""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from common.files import write_text_atomic


def load_config(path: str | os.PathLike | None, overrides: list[str], cls: type) -> Any:
    """The config of ``path`` (or the defaults) with ``section.field=value`` overrides applied, as
    ``cls`` (a frozen dataclass, e.g. ``trainer.config.RunConfig``); errors name the file and the
    key (``run.toml: train.mode must be ...``).
    Values are TOML (``3``, ``0.1``, ``true``, ``["a", "b"]``); bare words are strings."""
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected --section.field=value")
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[leaf] = _parse_value(value)
    try:
        return from_dict(cls, raw, "")
    except ValueError as e:
        raise type(e)(f"{path}: {e}" if path else str(e)) from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


_ROOTS = ("", "config")
"""Names of a whole file: its keys are named bare (``train.mode``, not ``config.train.mode``)."""

_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def from_dict(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    """Builds dataclass ``cls`` from ``raw``, recursively, naming the key of any error: unknown
    keys, missing required ones (fields without a default), values of the wrong type, and the
    ``ValueError`` of any ``__post_init__`` check. ``where`` names ``raw`` in messages ("" or
    "config": a whole file, whose keys are named bare)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    prefix = "" if where in _ROOTS else f"{where}: "
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{prefix}unknown key(s) {unknown}; allowed: {sorted(names)}")
    for f in fields:
        if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{prefix}missing required key '{f.name}'")
    kwargs = {k: _convert(hints[k], v, k if where in _ROOTS else f"{where}.{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise type(e)(f"{prefix}{e}") from None


def _convert(kind: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(kind)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ValueError(f"{where} must have {len(items)} items, got {value!r}")
        return tuple(_convert(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(items, value)))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _convert(option, value, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} fits none of {kind}")
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a table, got {value!r}")
        key_kind, value_kind = typing.get_args(kind) or (Any, Any)
        return {_convert(key_kind, k, where): _convert(value_kind, v, f"{where}.{k}") for k, v in value.items()}
    if kind is type(None):
        if value is not None:
            raise ValueError(f"{where} must be empty")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in _KINDS and (type(value) is not kind):
        raise ValueError(f"{where} must be {_KINDS[kind]}, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """The dataclass as plain TOML-ready values."""
    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(config)


def dump_config(config: Any, path: str | os.PathLike) -> None:
    """Writes the dataclass as TOML, whole or not at all."""
    write_text_atomic(path, tomli_w.dumps(to_dict(config)))
