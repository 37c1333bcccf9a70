"""Typed reading of YAML documents, with errors that name the file and key path.

Both gateway.yaml and the policy files are read through `Node`, so every mistake an
operator makes is reported as `file: key.path: what is wrong` before anything starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import yaml


class ConfigError(Exception):
    """A configuration or policy file is invalid; the message names file and key path."""

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        where = f"{file}: {key_path}" if key_path else file
        super().__init__(f"{where}: {problem}")
        self.file = file
        self.key_path = key_path
        self.problem = problem


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_yaml_file(path: Path) -> Node:
    """Parse one YAML file into a Node; a missing or unparsable file is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read file: {exc.strerror}") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), "", f"invalid YAML{line}") from exc
    if document is None:
        document = {}
    return Node(str(path), "", document)


class Node:
    """One value of a YAML document together with where it came from."""

    def __init__(self, file: str, key_path: str, value: Any) -> None:
        self.file = file
        self.key_path = key_path
        self.value = value

    def fail(self, problem: str) -> NoReturn:
        raise ConfigError(self.file, self.key_path, problem)

    def child(self, key: str | int, value: Any) -> Node:
        if isinstance(key, int):
            path = f"{self.key_path}[{key}]"
        else:
            path = f"{self.key_path}.{key}" if self.key_path else key
        return Node(self.file, path, value)

    # Mappings -----------------------------------------------------------------

    def mapping(self, allowed: set[str] | None = None) -> Mapping[str, Any]:
        """The value as a mapping; keys outside `allowed` are rejected (typos fail fast)."""
        if not isinstance(self.value, dict):
            self.fail(f"expected a mapping, got {_kind(self.value)}")
        for key in self.value:
            if not isinstance(key, str):
                self.fail(f"keys must be strings, got {key!r}")
            if allowed is not None and key not in allowed:
                known = ", ".join(sorted(allowed))
                self.child(key, None).fail(f"unknown key (known keys: {known})")
        return self.value

    def get(self, key: str) -> Node | None:
        """The child at `key`, or None when absent or null."""
        value = self.mapping().get(key)
        return None if value is None else self.child(key, value)

    def require(self, key: str) -> Node:
        node = self.get(key)
        if node is None:
            self.child(key, None).fail("is required")
        return node

    def items(self) -> Iterator[tuple[str, Node]]:
        for key, value in self.mapping().items():
            yield key, self.child(key, value)

    def elements(self) -> Iterator[Node]:
        if not isinstance(self.value, list):
            self.fail(f"expected a list, got {_kind(self.value)}")
        for index, value in enumerate(self.value):
            yield self.child(index, value)

    # Scalars ------------------------------------------------------------------

    def as_str(self) -> str:
        if isinstance(self.value, bool) or not isinstance(self.value, str | int | float):
            self.fail(f"expected a string, got {_kind(self.value)}")
        return self._interpolate(str(self.value))

    def as_int(self, minimum: int | None = None) -> int:
        value = self._scalar_from_env()
        if isinstance(value, bool):
            self.fail("expected an integer, got a boolean")
        try:
            number = int(value) if isinstance(value, int | str) else None
        except ValueError:
            number = None
        if number is None:
            self.fail(f"expected an integer, got {_kind(value)}")
        if minimum is not None and number < minimum:
            self.fail(f"must be at least {minimum}, got {number}")
        return number

    def as_float(self, minimum: float | None = None) -> float:
        value = self._scalar_from_env()
        if isinstance(value, bool):
            self.fail("expected a number, got a boolean")
        try:
            number = float(value) if isinstance(value, int | float | str) else None
        except ValueError:
            number = None
        if number is None:
            self.fail(f"expected a number, got {_kind(value)}")
        if minimum is not None and number < minimum:
            self.fail(f"must be at least {minimum}, got {number}")
        return number

    def as_bool(self) -> bool:
        value = self._scalar_from_env()
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        self.fail(f"expected true or false, got {_kind(value)}")

    def as_choice(self, choices: set[str]) -> str:
        value = self.as_str()
        if value not in choices:
            self.fail(f"must be one of {', '.join(sorted(choices))}; got {value!r}")
        return value

    def _scalar_from_env(self) -> Any:
        if isinstance(self.value, str):
            return self._interpolate(self.value)
        return self.value

    def _interpolate(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            self.fail(f"environment variable {name} is not set (write ${{{name}:-default}})")

        return _ENV_REFERENCE.sub(replace, text)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
