"""Checking a tool call's arguments against the tool's JSON schema (the keywords tool schemas use)."""

import math
import re
from typing import Any

TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: dict, path: str = "$") -> list[str]:
    """Why `value` does not fit `schema` (empty when it does).

    Covers type, enum, const, properties / required / additionalProperties, items / minItems / maxItems,
    string length and pattern, numeric bounds and multipleOf; other keywords are not checked.
    """
    if not isinstance(schema, dict):
        return []
    errors = []
    expected = schema.get("type")
    if expected is not None:
        kinds = expected if isinstance(expected, list) else [expected]
        if not any(TYPES.get(kind, lambda v: True)(value) for kind in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}: missing required '{key}'" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected key '{key}'")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(item, schema["additionalProperties"], f"{path}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            errors.append(f"{path}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match {schema['pattern']!r}")
    if TYPES["number"](value):
        bounds = [("minimum", lambda b: value < b), ("maximum", lambda b: value > b),
                  ("exclusiveMinimum", lambda b: value <= b), ("exclusiveMaximum", lambda b: value >= b)]
        errors += [f"{path}: {value} violates {name} {schema[name]}" for name, broken in bounds
                   if isinstance(schema.get(name), (int, float)) and broken(schema[name])]
        step = schema.get("multipleOf")
        if step and abs(value / step - round(value / step)) > 1e-9:
            errors.append(f"{path}: {value} is not a multiple of {step}")
    return errors
