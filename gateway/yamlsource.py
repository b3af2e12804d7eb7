"""Reading routes.yaml with positions (DESIGN §2, §3).

YAML is composed into nodes, ``${VAR}`` / ``${VAR:-default}`` are replaced in scalar
values from the environment, and the document is built into plain Python values while
the line and column of every dotted path is kept, so that any :class:`ConfigError` can be
rendered as ``routes.yaml:LINE:COL: dotted.path: message``.

Substitution is per scalar, after parsing, so a value can never inject YAML structure. An
unquoted ``${PORT}`` is typed as if its value had been written there (``8080`` is a
number), a quoted ``"${PORT}"`` stays text. Before parsing, each ``${...}`` is swapped for
a placeholder of the same length that YAML reads as plain text, so a reference also works
inside flow collections (``listen: {port: ${PORT}}``, where ``{`` would otherwise end the
scalar) and every column stays where it was in the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from middleware.schema import ConfigError

__all__ = ("LocatedError", "Source", "YamlError", "parse_yaml")

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Placeholders: one private-use character numbering the reference, then fill up to its length.
_FIRST, _FILL = 0xE000, "\uf8ff"
_PLACEHOLDER = re.compile("[\ue000-\uf8fe]\uf8ff*")
_PRIVATE_USE = re.compile("[\ue000-\uf8ff]")
_STR = "tag:yaml.org,2002:str"


@dataclass(frozen=True, slots=True)
class LocatedError:
    """One config error with its place in the file; ``str()`` is the `gateway check` line."""

    filename: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.filename}:{self.line}:{self.column}: {where}{self.message}"


@dataclass(frozen=True, slots=True)
class Source:
    """The parsed document and where each dotted path sits in the file."""

    filename: str
    data: object
    values: Mapping[str, tuple[int, int]]  # dotted path -> (line, column) of its value
    keys: Mapping[str, tuple[int, int]]  # dotted path -> (line, column) of its key

    def locate(self, error: ConfigError) -> LocatedError:
        """Place ``error`` at its path, or at the nearest ancestor that is in the file."""
        path = error.path
        table = self.keys if error.at_key else self.values
        while path and path not in table and path not in self.values:
            path = path.rpartition(".")[0]
        line, column = table.get(path) or self.values.get(path) or (1, 1)
        return LocatedError(self.filename, line, column, error.path, error.message)


def parse_yaml(text: str, *, filename: str, env: Mapping[str, str]) -> Source:
    """Parse one YAML document; raise :class:`ConfigError` located via the returned marks."""
    text, references = _protect(text)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlError(LocatedError(filename, line, column, "", f"invalid YAML: {exc.problem or exc}")) from None
    except yaml.YAMLError as exc:
        raise YamlError(LocatedError(filename, 1, 1, "", f"invalid YAML: {exc}")) from None
    builder = _Builder(env, filename, references)
    data = builder.build(node, "") if node is not None else {}
    return Source(filename, data, builder.values, builder.keys)


def _protect(text: str) -> tuple[str, list[str] | None]:
    """Swap each ``${...}``/``$$`` for a same-length placeholder; None: the file has private-use
    characters of its own (or unicode escapes that could make some), so references are replaced
    where they stand (not in flow collections)."""
    if _PRIVATE_USE.search(text) or "\\u" in text or "\\U" in text:
        return text, None
    references: list[str] = []

    def swap(match: re.Match[str]) -> str:
        if _FIRST + len(references) >= ord(_FILL):
            return match.group(0)
        references.append(match.group(0))
        return chr(_FIRST + len(references) - 1) + _FILL * (len(match.group(0)) - 1)

    return _VAR.sub(swap, text), references


class YamlError(Exception):
    """Raised for YAML that does not parse or build; carries its already-located error."""

    def __init__(self, error: LocatedError) -> None:
        super().__init__(str(error))
        self.error = error


class _Builder:
    def __init__(self, env: Mapping[str, str], filename: str, references: list[str] | None) -> None:
        self._env = env
        self._filename = filename
        self._references = references
        self._constructor = yaml.SafeLoader("")
        self._resolver = yaml.resolver.Resolver()
        self.values: dict[str, tuple[int, int]] = {}
        self.keys: dict[str, tuple[int, int]] = {}

    def build(self, node: yaml.Node, path: str) -> object:
        self.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            written = {id(key_node) for key_node, _ in node.value}
            self._constructor.flatten_mapping(node)  # `<<: *anchor` merge keys come first, then the keys written here
            result: dict[str, object] = {}
            seen: set[str] = set()  # keys written here (not merged in)
            for key_node, value_node in node.value:
                key = self._key(key_node, path)
                child = f"{path}.{key}" if path else key
                if id(key_node) in written:
                    if key in seen:
                        raise self._error(key_node, child, "duplicate key")
                    seen.add(key)
                if key in result:
                    self._forget(child)  # a key written here overrides the one merged in
                self.keys[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                result[key] = self.build(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [
                self.build(item, f"{path}.{index}" if path else str(index)) for index, item in enumerate(node.value)
            ]
        return self._scalar(node, path)

    def _forget(self, path: str) -> None:
        for table in (self.values, self.keys):
            for known in [p for p in table if p == path or p.startswith(path + ".")]:
                del table[known]

    def _key(self, node: yaml.Node, path: str) -> str:
        """Keys are taken as written (``on:`` is the word "on", not a boolean)."""
        if not isinstance(node, yaml.ScalarNode) or not node.value:
            raise self._error(node, path, "mapping keys must be plain words")
        return self._substitute(node, path) if self._has_reference(node.value) else str(node.value)

    def _scalar(self, node: yaml.Node, path: str) -> object:
        if not isinstance(node, yaml.ScalarNode):
            raise self._error(node, path, "expected a plain value here")
        if self._has_reference(node.value) and node.tag in (_STR, self._implicit_tag(node)):
            value = self._substitute(node, path)
            if node.style is None:  # an unquoted ${PORT} becomes a number again, as if written inline
                tag = self._resolver.resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
            else:
                tag = _STR
            node = yaml.ScalarNode(tag, value, node.start_mark, node.end_mark, node.style)
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self._error(node, path, f"invalid value: {getattr(exc, 'problem', None) or exc}") from None

    def _has_reference(self, value: str) -> bool:
        if self._references is None:
            return "$" in value
        return _PLACEHOLDER.search(value) is not None

    def _implicit_tag(self, node: yaml.ScalarNode) -> str:
        return str(self._resolver.resolve(yaml.ScalarNode, node.value, (True, False)))  # type: ignore[no-untyped-call]

    def _substitute(self, node: yaml.ScalarNode, path: str) -> str:
        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            value = self._env.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    raise self._error(node, path, f"environment variable {name} is not set (use ${{{name}:-default}})")
                return default
            return value

        text = str(node.value)
        if self._references is not None:
            references = self._references
            text = _PLACEHOLDER.sub(lambda m: references[ord(m.group(0)[0]) - _FIRST], text)
        return _VAR.sub(replace, text)

    def _error(self, node: yaml.Node, path: str, message: str) -> YamlError:
        mark = node.start_mark
        return YamlError(LocatedError(self._filename, mark.line + 1, mark.column + 1, path, message))
