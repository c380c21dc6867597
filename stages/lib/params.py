"""Parse one section of `params.yaml` into a dataclass, strictly.

Unknown keys, wrong types and missing required keys stop the stage with one
line naming `section.key`. Nested dataclasses are parsed the same way, so a
section may hold e.g. a `lora:` mapping; a trl / transformers config class is
a dataclass too and is accepted as a field type.
"""

import collections.abc
import dataclasses
import difflib
import enum
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from stages.lib.errors import StageError

T = TypeVar("T")

DEFAULT_PARAMS = "params.yaml"


class ParamsLoader(yaml.SafeLoader):
    """YAML as DVC reads params.yaml (YAML 1.2): only true / false are booleans, so a value such as
    `save_strategy: no`, which `dvc exp run -S` may write unquoted, stays the string it means."""


ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict:
    """Read a params file; YAML errors are reported as `file:line`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"{path}: params file not found") from None
    try:
        data = yaml.load(text, Loader=ParamsLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise StageError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a mapping of sections at the top level")
    return data


def parse_section(params: Mapping[str, Any], section: str, cls: type[T]) -> T:
    """Build `cls` from `params[section]`, naming `section.key` on any error."""
    if section not in params:
        raise StageError(f"{section}: section missing from params")
    return build(cls, params[section], section)


def load_section(path: str | Path, section: str, cls: type[T]) -> T:
    return parse_section(load_params(path), section, cls)


def build(cls: type[T], values: Any, where: str) -> T:
    """Instantiate dataclass `cls` from a mapping, checking every key and type."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise StageError(f"{where}: expected a mapping, got {_kind(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise StageError(f"{where}.{key}: unknown key{hint}")
    hints = _type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = coerce(values[name], hints.get(name, Any), f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise StageError(f"{where}.{name}: missing required key")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        # __post_init__ checks (ours, or a trl/transformers config's) land here. A message that
        # starts with a field name ("step must be >= 1") is reported against that key.
        message = " ".join(str(err).split())
        first, _, rest = message.partition(" ")
        if first in fields and rest:
            raise StageError(f"{where}.{first}: {rest}") from None
        raise StageError(f"{where}: {message}") from None


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` checked against `annotation` (converted where lossless)."""
    if annotation is Any or annotation is object:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # Try non-str members first so "3" does not silently become a str where int|str is allowed.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return coerce(value, arg, where)
            except StageError:
                continue
        raise StageError(f"{where}: expected {_describe(annotation)}, got {_kind(value)} {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        raise StageError(f"{where}: expected one of {choices}, got {value!r}")
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, list):
            raise StageError(f"{where}: expected a list, got {_kind(value)} {value!r}")
        item_type = args[0] if args else Any
        items = [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise StageError(f"{where}: expected a mapping, got {_kind(value)} {value!r}")
        if len(args) == 2:
            return {k: coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return value
    if annotation is type(None):
        if value is None:
            return None
        raise StageError(f"{where}: expected null, got {_kind(value)} {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise StageError(f"{where}: expected true or false, got {_kind(value)} {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise StageError(f"{where}: expected an integer, got {_kind(value)} {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        raise StageError(f"{where}: expected a number, got {_kind(value)} {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise StageError(f"{where}: expected a string, got {_kind(value)} {value!r}")
    if annotation is Path:
        if isinstance(value, str):
            return Path(value)
        raise StageError(f"{where}: expected a path string, got {_kind(value)} {value!r}")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in annotation)
            raise StageError(f"{where}: expected one of {choices}, got {value!r}") from None
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return build(annotation, value, where)
    # Types we cannot check (callables, library classes) pass through as given.
    return value


def _type_hints(cls: type) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a library class whose annotations do not resolve: check nothing
        return {}


def _describe(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    if type(None) in typing.get_args(annotation):
        names.append("null")
    return " or ".join(names)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)
