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
    """A configuration or policy file is invalid; the message names file, line and key path."""

    def __init__(self, file: str, key_path: str, problem: str, line: int | None = None) -> None:
        place = f"{file}:{line}" if line is not None else file
        where = f"{place}: {key_path}" if key_path else place
        super().__init__(f"{where}: {problem}")
        self.file = file
        self.key_path = key_path
        self.problem = problem
        self.line = line


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
        raise ConfigError(str(path), "", f"invalid YAML{line}: {getattr(exc, 'problem', exc)}") from exc
    if document is None:
        document = {}
    return Node(str(path), "", document, _line_numbers(text))


def _line_numbers(text: str) -> dict[str, int]:
    """Key path → 1-based line where its value starts, for error messages."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = str(key_node.value)
                child = f"{path}.{key}" if path else key
                walk(value_node, child)
                lines[child] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, f"{path}[{index}]")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


class Node:
    """One value of a YAML document together with where it came from."""

    def __init__(self, file: str, key_path: str, value: Any, lines: dict[str, int] | None = None) -> None:
        self.file = file
        self.key_path = key_path
        self.value = value
        self._lines = lines if lines is not None else {}

    def fail(self, problem: str) -> NoReturn:
        raise ConfigError(self.file, self.key_path, problem, self._line())

    def _line(self) -> int | None:
        """The line of this key, or of the nearest enclosing key that has one."""
        path = self.key_path
        while True:
            if path in self._lines:
                return self._lines[path]
            if not path:
                return None
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""

    def child(self, key: str | int, value: Any) -> Node:
        if isinstance(key, int):
            path = f"{self.key_path}[{key}]"
        else:
            path = f"{self.key_path}.{key}" if self.key_path else key
        return Node(self.file, path, value, self._lines)

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
