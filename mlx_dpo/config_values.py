"""How a setting's value from YAML, JSON or a flag's text becomes a `TrainConfig` field's
value: one `coerce` for every source, so `learning_rate: 1e-5` (a string to YAML 1.1) and
`--learning-rate 1e-5` mean the same, and a bad value is one `ConfigError` naming the field."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["ConfigError", "coerce", "field_kind"]


class ConfigError(ValueError):
    """A bad setting; the message names the field and what to do."""


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_WHAT = {
    int: "a whole number",
    float: "a finite number",
    str: "a string",
    bool: "true or false",
}
_TRUE, _FALSE = {"true", "yes", "on", "1", "y", "t"}, {"false", "no", "off", "0", "n", "f"}


def field_kind(f: dataclasses.Field) -> tuple[type, bool, bool]:
    """(element type, is a list, may be None) of a field annotated like 'list[float] | None'."""
    annotation = str(f.type)
    base = annotation.replace(" | None", "").strip()
    if base.startswith("list["):
        return _TYPES[base[5:-1]], True, "None" in annotation
    return _TYPES[base], False, "None" in annotation


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """`value` (from YAML, JSON or a flag's text) as the field's type, or ConfigError naming the
    field. YAML 1.1 reads `1e-5` as a string, so numbers given as text are parsed here."""
    kind, is_list, optional = field_kind(f)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{f.name}: expected {_WHAT[kind]}, got null")
    if is_list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{f.name}: expected a list of {_WHAT[kind]}s, got {value!r}")
        items = [i.strip() if isinstance(i, str) else i for i in items]
        return [_scalar(f.name, kind, i) for i in items if i != ""]
    return _scalar(f.name, kind, value)


def _scalar(name: str, kind: type, value: Any) -> Any:
    bad = ConfigError(f"{name}: expected {_WHAT[kind]}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise bad
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        number = float(value) if kind is float or isinstance(value, float) else int(value)
    except ValueError:
        raise bad from None
    if not math.isfinite(number):
        raise bad
    if kind is int:
        if isinstance(number, float) and not number.is_integer():
            raise bad
        return int(number)
    return float(number)
