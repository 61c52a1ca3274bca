"""Load a YAML config file into a pydantic model, with file:line: field errors.

PyYAML's composer keeps each node's line, so the file is composed once into nodes, turned
into plain data while remembering the line of every mapping key and list item, and then
validated. A pydantic error's ``loc`` is mapped back to the nearest line it knows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from hpc.errors import ConfigError, ConfigIssue
from hpc.spec import ModelsFile

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

_MERGE_TAG = "tag:yaml.org,2002:merge"


def format_loc(loc: Loc) -> str:
    """``('models', 1, 'resources', 'gpus')`` → ``models[1].resources.gpus``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Located:
    """Plain data from a YAML document plus the line (1-based) of every location in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: dict[Loc, int] = {}
        self.issues: list[ConfigIssue] = []

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            merges: list[yaml.Node] = []
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    merges.append(value_node)
                    continue
                key = self.build(key_node, (*loc, "<key>"))
                if not isinstance(key, str | int):
                    self._issue(key_node, loc, f"mapping keys must be text, not {key!r}")
                    continue
                child = (*loc, key)
                if key in out:
                    self._issue(key_node, child, "duplicate key (the earlier value would be lost)")
                self.lines[child] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, child)
            for value_node in merges:
                self._merge(value_node, loc, out)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        # Scalars: let the safe constructor pick the type (int, float, bool, null, str).
        try:
            return yaml.SafeLoader("").construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as exc:  # an unknown tag, `!!int abc`
            self._issue(node, loc, f"YAML: {getattr(exc, 'problem', None) or exc}")
            return None

    def _merge(self, value_node: yaml.Node, loc: Loc, out: dict[Any, Any]) -> None:
        """``<<: *defaults`` (or a list of them); keys written in the mapping itself win."""
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                self._issue(source, loc, "`<<` can only merge mappings")
                continue
            located = _Located(self.path)
            data = located.build(source, loc)
            self.issues += located.issues
            for key, value in data.items():
                if key in out:
                    continue
                out[key] = value
                # Lines of merged keys point into the anchor, where the value is written.
                for sub, line in located.lines.items():
                    if sub[: len(loc) + 1] == (*loc, key):
                        self.lines.setdefault(sub, line)

    def _issue(self, node: yaml.Node, loc: Loc, message: str) -> None:
        self.issues.append(
            ConfigIssue(self.path, node.start_mark.line + 1, format_loc(loc), message)
        )

    def line_of(self, loc: Loc) -> int | None:
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return None


def read_yaml(path: Path) -> tuple[Any, _Located]:
    """Parse ``path``; a syntax error or duplicate key becomes a ConfigError naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            path,
            [ConfigIssue(path, None, "", "file not found")],
            hint=f"create {path} (samples in docs/examples/) or pass another file",
        ) from exc
    except UnicodeDecodeError as exc:
        bad_line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(path, [ConfigIssue(path, bad_line, "", "not UTF-8 text")]) from exc
    except OSError as exc:
        raise ConfigError(
            path, [ConfigIssue(path, None, "", f"cannot read: {exc.strerror}")]
        ) from exc
    located = _Located(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, [ConfigIssue(path, line, "", f"YAML syntax: {problem}")]) from exc
    data = located.build(node, ()) if node is not None else {}
    if located.issues:
        raise ConfigError(path, located.issues)
    return data, located


def load_model(
    path: Path,
    model: type[M],
    check: Callable[[M, Callable[[Loc], int | None]], list[tuple[Loc, str]]] | None = None,
) -> M:
    """Read ``path`` as ``model``; every bad field becomes one ConfigIssue with its line.

    ``check`` runs after validation for rules that span entries (such as unique names) and
    returns ``(loc, message)`` pairs.
    """
    data, located = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(path, [ConfigIssue(path, 1, "", "the file must hold a mapping")])
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        issues = []
        for err in exc.errors(include_url=False):
            loc: Loc = tuple(err["loc"])
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                message = "unknown field (check the spelling)"
            issues.append(ConfigIssue(path, located.line_of(loc), format_loc(loc), message))
        raise ConfigError(path, issues) from exc
    if check is not None:
        problems = check(value, located.line_of)
        if problems:
            raise ConfigError(
                path,
                [
                    ConfigIssue(path, located.line_of(loc), format_loc(loc), msg)
                    for loc, msg in problems
                ],
            )
    return value


def _unique_names(
    models: ModelsFile, _line_of: Callable[[Loc], int | None]
) -> list[tuple[Loc, str]]:
    seen: dict[str, str] = {}
    problems: list[tuple[Loc, str]] = []
    entries: list[tuple[str, int, str]] = [
        ("models", i, m.name) for i, m in enumerate(models.models)
    ]
    entries += [("pools", i, p.name) for i, p in enumerate(models.pools)]
    entries += [("static", i, s.name) for i, s in enumerate(models.static)]
    for section, index, name in entries:
        where = f"{section}[{index}]"
        if name in seen:
            problems.append(
                ((section, index, "name"), f"duplicate model name {name!r} (first in {seen[name]})")
            )
        else:
            seen[name] = where
    return problems + _pool_catalogues(models)


def _pool_catalogues(models: ModelsFile) -> list[tuple[Loc, str]]:
    """Every name in a pool's catalogue must be a model of the same file."""
    known = [m.name for m in models.models]
    problems: list[tuple[Loc, str]] = []
    for i, pool in enumerate(models.pools):
        for j, name in enumerate(pool.models):
            if name not in known:
                problems.append(
                    (
                        ("pools", i, "models", j),
                        f"pool {pool.name!r} lists {name!r}, which is not a model in this "
                        f"file (models: {', '.join(known) or 'none'})",
                    )
                )
    return problems


def load_models(path: Path) -> ModelsFile:
    """Load ``models.yaml``: schema errors and duplicate names, each with file:line: field."""
    return load_model(path, ModelsFile, _unique_names)
