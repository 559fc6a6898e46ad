"""Nested dataclass configs: build from dicts/YAML, dotted overrides, round trip to dicts.

Every section is a `kw_only, slots` dataclass that validates itself in `__post_init__` and
raises `ValueError` naming the field (for example `algo.t_mix`). This module adds the parts
that are the same for every section: unknown keys, wrong types, and `a.b.c=value` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def from_dict(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; `path` is the dotted prefix used in errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'} must be a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean {_join(path, close[0])!r}?" if close else ""
        raise ValueError(
            f"unknown config field {_join(path, key)!r}{hint} Valid fields of "
            f"{path or 'the run config'}: {', '.join(sorted(fields))}"
        )
    kwargs = {key: _convert(hints[key], value, _join(path, key)) for key, value in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML-safe) view of a config."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply `section.field=value` overrides to a config dict (values parsed as YAML scalars).

    >>> apply_overrides({"algo": {"t_mix": 4}}, ["algo.t_mix=8", "run.name=demo"])
    {'algo': {'t_mix': 8}, 'run': {'name': 'demo'}}
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like section.field=value (e.g. algo.t_mix=8)")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = parse_yaml(raw, where=f"override {item!r}") if raw.strip() else ""
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a repeated key (plain YAML keeps the last
    value silently, so `lr: 1e-6` written twice in a section would hide the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)  # resolve `<<` merge keys first: a merge may be overridden
        first_line: dict = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):
                continue  # the base constructor reports an unhashable key itself
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} at line {line} (first at line {first_line[key]}); "
                    "keep one of them", key_node.start_mark)
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: Any, *, where: str) -> Any:
    """yaml.safe_load that refuses duplicate keys; ValueError naming `where` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ValueError(f"{where} is not valid YAML: {err}") from None


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = parse_yaml(f, where=f"config file {path}")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist; see examples/ for recipes") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(hint: Any, value: Any, path: str) -> Any:
    """Check/convert one value against its annotation; errors name the dotted field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ValueError(f"{path} must be one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path} must be a list, got {value!r}")
        (item_hint, *_rest) = typing.get_args(hint) or (Any,)
        return [_convert(item_hint, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping, got {value!r}")
        _key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {k: _convert(value_hint, v, _join(path, k)) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ValueError(f"{path} must be one of {[e.value for e in hint]}, got {value!r}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-6` (no dot) as a string; a float field takes it as the number.
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{path} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path} must be a number, got {value!r}")
        if not math.isfinite(value):  # `.inf` / `.nan` parse as floats and pass every `> 0` check
            raise ValueError(f"{path} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    return value


def check(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless `condition`: the one-line validation used by sections."""
    if not condition:
        raise ValueError(message)
