"""Mapping nested tables (TOML, ``key=value`` overrides) onto typed dataclasses and back.

:func:`from_dict` builds a dataclass from a mapping, checking every key and the
type of every value against the fields' annotations, nested dataclasses
included; unknown keys and values of the wrong type are a :class:`ConfigError`
that names the key and says what was expected; nothing is coerced silently
except an int where a float is expected. A dataclass that chooses some of its
keys itself (a method's settings in ``[gate]``) has a ``from_table`` classmethod
that rewrites its table first. :func:`to_dict` and :func:`toml_value` go the
other way. Nothing here knows which configuration it maps: that is
:mod:`bbdrop.config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from bbdrop import validate

__all__ = ["ConfigError", "from_dict", "to_dict", "toml_value"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly nested) mapping, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a table, got {data!r}")
    if hasattr(cls, "from_table"):  # a table with keys of its own choosing
        data = cls.from_table(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {_join(where, unknown[0])!r}; {cls.__name__} has: {known}")
    kwargs = {k: _check(hints[k], v, _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - all fields have defaults
        raise ConfigError(str(err)) from err


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table of settings, got {value!r}")
        (_, item) = typing.get_args(tp)
        return {str(k): _check(item, v, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        (item, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {_describe(item)}, got {value!r}")
        return tuple(_check(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if not validate.is_number(value, finite=False):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not validate.is_number(value):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return float(value)
    if tp is int:
        if not validate.is_whole(value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover


def _describe(tp: Any) -> str:
    if not typing.get_args(tp):
        return {float: "numbers", int: "integers", str: "strings", bool: "booleans"}.get(
            tp, getattr(tp, "__name__", str(tp))
        )
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    return f"{names} or none" if len(args) < len(typing.get_args(tp)) else names


def to_dict(cfg: Any) -> dict[str, Any]:
    """The configuration as plain nested dicts (tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif isinstance(value, dict):
            out[f.name] = dict(value)
        else:
            out[f.name] = value
    return out


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} to TOML")  # pragma: no cover
