"""Parameter objects: a function that takes a settings dataclass also accepts its fields as keywords.

``export_onnx(model, path, 64, OnnxSettings(names=names))`` and ``export_onnx(model, path, 64,
names=names)`` are the same call; a new option is one field of the dataclass, not a new parameter of
every function that passes it on.
"""

from __future__ import annotations

from typing import Any, TypeVar

Settings = TypeVar("Settings")


def settings_or_fields(cls: type[Settings], settings: Settings | None, fields: dict[str, Any]) -> Settings:
    """``settings`` when given, else ``cls(**fields)``; both at once is a caller's mistake (TypeError).

    An unknown keyword raises the dataclass's own TypeError naming it.
    """
    if settings is None:
        return cls(**fields)
    if fields:
        raise TypeError(f"give a {cls.__name__} or its fields as keywords, not both ({', '.join(fields)})")
    if not isinstance(settings, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(settings).__name__}")
    return settings
