"""Checking a tool call's arguments against the tool's JSON schema, with jsonschema."""

import functools
import re
from typing import Any

from jsonschema import Draft202012Validator, validators

# The order in which one value's errors are listed; keywords not named here come after, alphabetically.
KEYWORD_ORDER = ("type", "enum", "const", "required", "additionalProperties", "minItems", "maxItems", "minLength",
                 "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _multiple_of(validator, step, instance, schema):
    # jsonschema divides floats exactly, so 19.99 is not a multiple of 0.01; a call's arguments are decimal text.
    if validator.is_type(instance, "number") and step and abs(instance / step - round(instance / step)) > 1e-9:
        yield validators.ValidationError(f"{instance} is not a multiple of {step}")


@functools.cache
def _validator_class(base):
    return validators.extend(base, {"multipleOf": _multiple_of})


def _validator(schema: dict):
    """A validator of the draft the schema names in `$schema`, 2020-12 when it names none."""
    return _validator_class(validators.validator_for(schema, default=Draft202012Validator))(schema)


def _where(path) -> str:
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


def _positions(value: Any, path) -> list[int]:
    """Where `path` leads in `value`, as indices in its mappings' and lists' own order."""
    positions = []
    for part in path:
        positions.append(list(value).index(part) if isinstance(value, dict) else part)
        value = value[part]
    return positions


def _extra_keys(instance: dict, schema: dict) -> list[str]:
    patterns = schema.get("patternProperties", {})
    return [key for key in instance
            if key not in schema.get("properties", {}) and not any(re.search(p, key) for p in patterns)]


def _messages(error) -> list[tuple[list[int], str]]:
    """The error as lines, each with where it sits below the error's value: an unexpected key sits at that key."""
    where, kind, bound, value = _where(error.absolute_path), error.validator, error.validator_value, error.instance
    if kind == "type":
        kinds = bound if isinstance(bound, list) else [bound]
        return [([], f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__}")]
    if kind == "required":
        return [([], f"{where}: missing required '{key}'") for key in bound if key not in value]
    if kind == "additionalProperties":
        return [([list(value).index(key)], f"{where}: unexpected key '{key}'")
                for key in _extra_keys(value, error.schema)]
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        text = f"{value} violates {kind} {bound}"
    elif kind in ("minLength", "maxLength"):
        text = f"length {len(value)} out of bounds"
    elif kind == "enum":
        text = f"{value!r} is not one of {bound}"
    elif kind == "const":
        text = f"expected {bound!r}"
    elif kind == "minItems":
        text = f"fewer than {bound} items"
    elif kind == "maxItems":
        text = f"more than {bound} items"
    elif kind == "pattern":
        text = f"does not match {bound!r}"
    else:
        text = error.message
    return [([], f"{where}: {text}")]


def schema_errors(value: Any, schema: dict) -> list[str]:
    """Why `value` does not fit `schema` (empty when it does), one line each, `$.key[index]: reason`.

    A value of the wrong type gets only its type error. Lines follow the value's own order of keys and
    items, a value's own errors before those of what it holds.
    """
    if not isinstance(schema, dict):
        return []
    errors = list(_validator(schema).iter_errors(value))
    mistyped = {(tuple(e.absolute_path), id(e.schema)) for e in errors if e.validator == "type"}
    ranked = []
    for error in errors:
        if (tuple(error.absolute_path), id(error.schema)) in mistyped and error.validator != "type":
            continue
        rank = KEYWORD_ORDER.index(error.validator) if error.validator in KEYWORD_ORDER else len(KEYWORD_ORDER)
        for below, message in _messages(error):
            ranked.append((_positions(value, error.absolute_path) + below, rank, error.validator, message))
    ranked.sort(key=lambda entry: entry[:3])  # stable: one keyword's lines keep their order
    return list(dict.fromkeys(message for *_, message in ranked))
