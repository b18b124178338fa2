"""Reading the YAML config file: a strict loader (a key given twice is an error) and a
walker over its mappings that refuses unknown keys and wrong types, naming the dotted key
and the file in every `ConfigError` (`gateway.config` builds the typed config with it).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import yaml

from gateway.errors import ConfigError

T = TypeVar("T")


def read_yaml(p: Path, file: str) -> object:
    """The document in `p` (`file` is how errors name it).

    Raises:
        ConfigError: unreadable, not UTF-8, or not valid YAML (with the line).
    """
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", f"not UTF-8 text (byte {exc.start})") from exc
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(file, "", f"{where}not valid YAML: {problem}") from exc
    return data


class Reader:
    """Walks one mapping of the YAML document, refusing unknown keys and wrong types."""

    def __init__(self, file: str, path: str, data: object) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(file, path, f"must be a mapping, got {kind(data)}")
        self.file = file
        self.path = path
        self.data: Mapping[object, object] = data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), message)

    def raw(self, name: str) -> object:
        self.seen.add(name)
        return self.data.get(name)

    def has(self, name: str) -> bool:
        return name in self.data

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {kind(value)}")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer, got {kind(value)}")
        if not low <= value <= high:
            raise self.error(name, f"must be between {low} and {high}, got {value}")
        return value

    def seconds(self, name: str, default: float, low: float, high: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"must be a number of seconds, got {kind(value)}")
        # Compare before any float conversion: a 400-digit integer must not overflow.
        if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
            raise self.error(name, f"must be between {low:g} and {high:g} seconds, got {value}")
        return float(value)

    def string(self, name: str, default: str) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise self.error(name, f"must be a non-empty string, got {kind(value)}")
        return value

    def choice(self, name: str, enum_type: type[enum.Enum], default: T) -> T:
        value = self.raw(name)
        if value is None:
            return default
        allowed = [m.value for m in enum_type]
        if value not in allowed:
            raise self.error(name, f"must be one of {', '.join(allowed)}, got {value!r}")
        member: T = enum_type(value)  # type: ignore[assignment] # T is the enum given
        return member

    def path_value(self, name: str, default: Path | None, base: Path) -> Path | None:
        value = self.raw(name)
        if value is None:
            return None if default is None else base / default
        if not isinstance(value, str) or not value:
            raise self.error(name, f"must be a file path, got {kind(value)}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    def section(self, name: str) -> Reader:
        return Reader(self.file, self.key(name), self.raw(name))

    def items(self, name: str) -> list[Reader]:
        value = self.raw(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(name, f"must be a list, got {kind(value)}")
        return [Reader(self.file, f"{self.key(name)}[{i}]", v) for i, v in enumerate(value)]

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(name, "must be a list of non-empty strings")
        return tuple(value)

    def done(self) -> None:
        unknown = [str(k) for k in self.data if k not in self.seen]
        if unknown:
            raise ConfigError(self.file, self.key(unknown[0]), "unknown key")


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error, not "last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def kind(value: object) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"[:80]
