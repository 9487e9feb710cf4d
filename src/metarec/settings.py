"""Typed step settings: one dataclass per model / step, defaults beside the fields, one strict parser.

Every step (preprocess, train, evaluate, select, package, serve) and the model declare their
settings as a frozen dataclass deriving from :class:`Settings`. ``from_dict`` is the one place a
partial dict from a run config, a component input or ``model-config.yaml`` becomes settings: unknown
keys are refused by name, values are coerced to the field's type and each class validates the rest
in ``validate``. ``to_dict`` gives back the JSON form written into model.json, reports and cards.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Self, get_args, get_origin


class Settings:
    """Base of every settings dataclass (subclasses are ``@dataclasses.dataclass(frozen=True)``).

    Class attribute ``section`` names the settings in error messages (e.g. ``"train"``).
    """

    section: typing.ClassVar[str] = "settings"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> Self:
        """Builds settings from a partial dict over the defaults.

        Args:
            values: overrides by field name (None or {} keeps every default).
            **overrides: more overrides, applied after ``values``.

        Returns:
            The validated settings.

        Raises:
            ValueError: an unknown key (named, with the known ones), a value of the wrong type, or
                whatever ``validate`` refuses.
        """
        merged = {**dict(values or {}), **overrides}
        names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(merged) - set(names))
        if unknown:
            raise ValueError(f"{cls.section} settings: unknown key(s) {unknown}; known keys: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        coerced = {name: _coerce(cls.section, name, hints[name], value) for name, value in merged.items()}
        settings = cls(**coerced)  # type: ignore[call-arg]
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raises ValueError for values that type coercion cannot catch (override per class)."""

    def to_dict(self) -> dict[str, Any]:
        """Returns the settings as JSON-serialisable values (tuples become lists)."""
        return {name: _plain(value) for name, value in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    def replace(self, **changes: Any) -> Self:
        """Returns a copy with some fields changed, validated like ``from_dict``."""
        return type(self).from_dict({**self.to_dict(), **changes})


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _coerce(section: str, name: str, hint: Any, value: Any) -> Any:
    """Checks ``value`` against a field's type and converts lossless cases (int -> float, list -> tuple)."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(section, name, option, value)
            except ValueError as err:
                errors.append(err)
        raise errors[0] if errors else ValueError(f"{section} settings: {name} must not be null")
    if origin is typing.Literal:
        if value not in get_args(hint):
            raise ValueError(
                f"{section} settings: {name} must be one of {list(get_args(hint))}, got {value!r}"
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{section} settings: {name} must be a list, got {value!r}")
        (item_hint, *_rest) = get_args(hint) or (Any,)
        return tuple(_coerce(section, name, item_hint, item) for item in value)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{section} settings: {name} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{section} settings: {name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{section} settings: {name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{section} settings: {name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{section} settings: {name} must be a string, got {value!r}")
        return value
    return value
