"""A validator for the small JSON Schema subset the API's schemas use.

Supported keywords: type (a name or a list of names), properties, required,
additionalProperties (bool), items, minItems, maxItems, minLength, maxLength,
minimum, maximum, exclusiveMinimum, enum, anyOf, default, and the extension
`x-hint` (appended to the error message).  The same schema dicts are published
in the OpenAPI document, so what is documented is exactly what is checked.
"""

from __future__ import annotations

from typing import Any

from ukgpu.kernel.api.errors import ApiError, bad_request

_PY_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),  # JSON Schema: 1.0 is an integer
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(schema: dict, value: Any, path: str = "") -> Any:
    """Return `value` with object defaults filled in; raise a 400 `ApiError` if it does not fit."""
    if "anyOf" in schema:
        return _validate_any_of(schema, value, path)
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_PY_TYPES[name](value) for name in names):
            _fail(schema, path, f"must be of type {' or '.join(names)}, got {_json_type(value)}")
        if isinstance(value, float) and "integer" in names and "number" not in names:
            value = int(value)
    if "enum" in schema and value not in schema["enum"]:
        _fail(schema, path, f"must be one of {schema['enum']}, got {value!r}")
    if isinstance(value, dict):
        return _validate_object(schema, value, path)
    if isinstance(value, list):
        return _validate_array(schema, value, path)
    if isinstance(value, str):
        _check_bounds(schema, len(value), path, "minLength", "maxLength", "characters long")
    elif _PY_TYPES["number"](value):
        _check_number(schema, value, path)
    return value


def _validate_any_of(schema: dict, value: Any, path: str) -> Any:
    for option in schema["anyOf"]:
        try:
            return validate(option, value, path)
        except ApiError:
            continue
    kinds = ", ".join(_describe(option) for option in schema["anyOf"])
    _fail(schema, path, f"must be one of: {kinds}")


def _validate_object(schema: dict, value: dict, path: str) -> dict:
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            _fail(schema, _join(path, name), "is required", param=_join(path, name))
    if schema.get("additionalProperties") is False:
        extra = sorted(set(value) - set(props))
        if extra:
            _fail(schema, path, f"has unknown field(s) {extra}")
    out = dict(value)
    for name, sub in props.items():
        if name in value:
            out[name] = validate(sub, value[name], _join(path, name))
        if out.get(name) is None and "default" in sub:
            out[name] = sub["default"]  # absent or null: the documented default
    return out


def _validate_array(schema: dict, value: list, path: str) -> list:
    _check_bounds(schema, len(value), path, "minItems", "maxItems", "items long")
    items = schema.get("items")
    if items is None:
        return value
    return [validate(items, item, f"{path}[{i}]") for i, item in enumerate(value)]


def _check_bounds(schema: dict, size: int, path: str, lo_key: str, hi_key: str, unit: str) -> None:
    if lo_key in schema and size < schema[lo_key]:
        _fail(schema, path, f"must be at least {schema[lo_key]} {unit}, got {size}")
    if hi_key in schema and size > schema[hi_key]:
        _fail(schema, path, f"must be at most {schema[hi_key]} {unit}, got {size}")


def _check_number(schema: dict, value: float, path: str) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        _fail(schema, path, "must be a finite number")
    if "minimum" in schema and value < schema["minimum"]:
        _fail(schema, path, f"must be >= {schema['minimum']}, got {value}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        _fail(schema, path, f"must be > {schema['exclusiveMinimum']}, got {value}")
    if "maximum" in schema and value > schema["maximum"]:
        _fail(schema, path, f"must be <= {schema['maximum']}, got {value}")


def _fail(schema: dict, path: str, problem: str, param: str | None = None) -> None:
    where = f"'{path}'" if path else "The request body"
    hint = schema.get("x-hint")
    message = f"{where} {problem}." + (f" {hint}" if hint else "")
    raise bad_request(message, param=param or (path or None), code="invalid_value")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(schema: dict) -> str:
    if "type" not in schema:
        return "a value"
    kind = schema["type"]
    if kind == "array" and "items" in schema:
        return f"array of {_describe(schema['items'])}"
    return kind if isinstance(kind, str) else "/".join(kind)


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _PY_TYPES[name](value):
            return name
    return type(value).__name__
