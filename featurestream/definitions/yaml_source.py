"""Safe YAML reading that remembers the line of every key and list item.

Limits keep a huge or hostile file (deep nesting, alias bombs) an error rather than a hang.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_NODES = 200_000
MAX_DEPTH = 64

PathKey = tuple[str | int, ...]


class YamlReadError(Exception):
    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


@dataclass
class YamlDocument:
    path: Path
    data: Any
    lines: dict[PathKey, int] = field(default_factory=dict)

    def line_of(self, path: PathKey) -> int | None:
        """Line of the deepest existing node on ``path``; pydantic locations may hold extra parts
        (union tags like 'sliding') that are not in the file, so those are skipped."""
        best = self.lines.get(())
        current: PathKey = ()
        for part in path:
            candidate = (*current, part)
            if candidate in self.lines:
                current = candidate
                best = self.lines[candidate]
        return best


def _index_lines(node: yaml.Node, path: PathKey, lines: dict[PathKey, int], budget: list[int]) -> None:
    if len(path) > MAX_DEPTH:
        raise YamlReadError(f"nesting deeper than {MAX_DEPTH} levels", node.start_mark.line + 1)
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlReadError(f"more than {MAX_NODES} values (after expanding aliases)", node.start_mark.line + 1)
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            lines.setdefault((*path, key), key_node.start_mark.line + 1)
            _index_lines(value_node, (*path, key), lines, budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, (*path, index), lines, budget)


def read_yaml(path: Path) -> YamlDocument:
    """Parse one YAML file (a single document) with the safe loader and index its lines."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise YamlReadError(f"file is {size} bytes; definitions files are limited to {MAX_FILE_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise YamlReadError(f"not UTF-8 text: {exc}") from exc
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return YamlDocument(path, None, {})
        lines: dict[PathKey, int] = {}
        _index_lines(node, (), lines, [MAX_NODES])
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise YamlReadError(f"invalid YAML: {exc.problem or exc.context}", line) from exc
    except yaml.YAMLError as exc:
        raise YamlReadError(f"invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise YamlReadError("nesting too deep to read") from exc
    finally:
        loader.dispose()
    return YamlDocument(path, data, lines)
