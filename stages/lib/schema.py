"""Checking a tool call's arguments against the tool's JSON schema, with jsonschema."""

import functools
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators


def _multiple_of(validator, step, instance, schema):
    # jsonschema divides floats exactly, so 19.99 is not a multiple of 0.01; a call's arguments are decimal text.
    if validator.is_type(instance, "number") and step and abs(instance / step - round(instance / step)) > 1e-9:
        yield ValidationError(f"{instance} is not a multiple of {step}")


@functools.cache
def _validator_class(base):
    return validators.extend(base, {"multipleOf": _multiple_of})


def schema_errors(value: Any, schema: dict) -> list[str]:
    """Why `value` does not fit `schema` (empty when it does): jsonschema's messages, one line each,
    `$.key[index]: message`, in the order of the paths. The schema's `$schema` draft applies (default 2020-12)."""
    if not isinstance(schema, dict):
        return []
    validator = _validator_class(validators.validator_for(schema, default=Draft202012Validator))(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"${''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in e.absolute_path)}: {e.message}"
            for e in errors]
