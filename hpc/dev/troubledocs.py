"""Generate docs/troubleshooting.md from the code: every error `mt` and the gateway can give.

    python -m hpc.dev.troubledocs            # rewrite docs/troubleshooting.md
    python -m hpc.dev.troubledocs --check    # exit 1 if the committed file is out of date

The entries are read with :mod:`ast`, never by importing or running the code:

- every ``raise SomeError(message, hint=...)`` in hpc/, gateway/ and tunnels/ whose class is
  in the ``MTError`` tree (hpc/errors.py), plus the messages such classes compose in their own
  ``__init__`` and the ``ConfigIssue`` messages a bad config file gets;
- the gateway's error codes, from the status/type/code table in gateway/errors.py's docstring,
  with the message of every ``openai_error(...)`` or ``ErrorReply(...)`` call that names its
  code literally.

f-strings are shown with their fields as ``{name}``. Hints that are module constants or
local variables are resolved; anything else is shown as the expression. A gateway code
without advice in ``GATEWAY_ADVICE`` is an error here, so a new code cannot ship undocumented.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hpc.dev.gatewayadvice import GATEWAY_ADVICE

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("hpc", "gateway", "tunnels")
DOC = Path("docs") / "troubleshooting.md"
REGENERATE = "python -m hpc.dev.troubledocs"


@dataclass(frozen=True)
class ErrorEntry:
    """One message `mt` can print: where it is raised, what it means, the hint it carries."""

    module: str
    function: str
    error_class: str
    message: str
    hint: str | None


@dataclass(frozen=True)
class GatewayCode:
    """One gateway error code: its HTTP status, OpenAI type and the messages that carry it."""

    status: int
    type: str
    code: str
    messages: tuple[str, ...]


def _render(node: ast.expr | None, scopes: list[dict[str, ast.expr]]) -> str | None:
    """The text of a string expression, f-string fields as ``{expr}``; None if not a string."""
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                parts.append("{" + ast.unparse(value.value) + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _render(node.left, scopes), _render(node.right, scopes)
        if left is not None and right is not None:
            return left + right
    if isinstance(node, ast.Name):
        for scope in scopes:
            if node.id in scope:
                return _render(scope[node.id], scopes)
    return None


def _assignments(body: list[ast.stmt]) -> dict[str, ast.expr]:
    """Names bound once to a value in ``body`` (not nested functions): hint constants."""
    found: dict[str, ast.expr] = {}
    seen: set[str] = set()
    for node in body:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Assign) and len(sub.targets) == 1:
                target = sub.targets[0]
                if isinstance(target, ast.Name):
                    if target.id in seen:
                        found.pop(target.id, None)  # bound twice: ambiguous, show the name
                    else:
                        found[target.id] = sub.value
                    seen.add(target.id)
    return found


def _python_files(root: Path) -> Iterator[tuple[str, ast.Module]]:
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            yield path.relative_to(root).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def _base_names(node: ast.ClassDef) -> list[str]:
    return [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]


def error_classes(modules: list[tuple[str, ast.Module]]) -> dict[str, str]:
    """Every class in the MTError tree, with the first line of its docstring."""
    bases: dict[str, list[str]] = {}
    docs: dict[str, str] = {}
    for _, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = _base_names(node)
                docs[node.name] = (ast.get_docstring(node) or "").strip().split("\n", 1)[0]
    tree_members = {"MTError"}
    changed = True
    while changed:
        changed = False
        for name, parents in bases.items():
            if name not in tree_members and any(p in tree_members for p in parents):
                tree_members.add(name)
                changed = True
    return {name: docs.get(name, "") for name in sorted(tree_members)}


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.AST, list[ast.stmt]]]:
    """(qualified name, node, body) of every function, and the module itself as ``<module>``."""
    yield "<module>", tree, tree.body
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, parent = stack.pop()
        for child in ast.iter_child_nodes(parent):
            if isinstance(child, ast.ClassDef):
                stack.append((f"{prefix}{child.name}.", child))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{prefix}{child.name}", child, child.body
                stack.append((f"{prefix}{child.name}.", child))


def _call_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def error_entries(modules: list[tuple[str, ast.Module]]) -> list[ErrorEntry]:
    """Every MTError-tree message with its hint, in file and source order, without repeats."""
    classes = error_classes(modules)
    entries: list[ErrorEntry] = []
    for module, tree in modules:
        module_scope = _assignments(tree.body)
        for function, node, body in _functions(tree):
            if function == "<module>":
                continue
            scopes = [_assignments(body), module_scope]
            owner = function.split(".")[0]
            for sub in ast.walk(node):
                if not isinstance(sub, ast.Call):
                    continue
                name = _call_name(sub)
                message: str | None = None
                error_class = name
                if name in classes and sub.args:
                    message = _render(sub.args[0], scopes)
                elif name == "__init__" and owner in classes and function.endswith("__init__"):
                    # super().__init__(message, hint=...) inside an error class: the class
                    # composes its own message (JobNotFoundError, LocalPortInUseError).
                    if sub.args:
                        message = _render(sub.args[0], scopes)
                    error_class = owner
                elif name == "ConfigIssue" and len(sub.args) >= 4:
                    message = _render(sub.args[3], scopes)
                    error_class = "ConfigError"
                if message is None or not message.strip():
                    continue
                hint_node = _keyword(sub, "hint")
                hint = _render(hint_node, scopes) if hint_node is not None else None
                if hint is None and hint_node is not None:
                    shown = ast.unparse(hint_node)
                    hint = None if shown in ("hint", "None") else f"(computed: `{shown}`)"
                if error_class == "ConfigError" and hint is None:
                    hint = "fix {path} and run the command again"
                entry = ErrorEntry(module, function, error_class, message, hint)
                if entry not in entries:
                    entries.append(entry)
    return entries


# Calls that name a gateway error code: a response, or a refusal returned as a value.
_ERROR_CALLS = ("openai_error", "ErrorReply")
_TABLE_ROW = re.compile(r"^\s+(\d{3})?\s+(\w+_error)?\s+(.*?)\s*$")


def gateway_codes(modules: list[tuple[str, ast.Module]]) -> list[GatewayCode]:
    """The status/type/code table of gateway/errors.py, with each code's literal messages."""
    errors = dict(modules)["gateway/errors.py"]
    doc = ast.get_docstring(errors) or ""
    table: list[tuple[int, str, str]] = []
    status, type_ = 0, ""
    in_table = False
    for line in doc.splitlines():
        if line.strip().startswith("status"):
            in_table = True
            continue
        if in_table and not line.strip():
            break
        match = _TABLE_ROW.match(line) if in_table else None
        if match is None:
            continue
        status = int(match.group(1)) if match.group(1) else status
        type_ = match.group(2) or type_
        for code in re.findall(r"[a-z_]+", match.group(3).split("(")[0]):
            table.append((status, type_, code))
    messages: dict[str, list[str]] = {code: [] for _, _, code in table}
    for module, tree in modules:
        if not module.startswith("gateway/"):
            continue
        for _, node, body in _functions(tree):
            scopes = [_assignments(body)]
            for sub in ast.walk(node):
                if not (isinstance(sub, ast.Call) and _call_name(sub) in _ERROR_CALLS):
                    continue
                if len(sub.args) < 4:
                    continue
                code_text = _render(sub.args[3], [])
                message = _render(sub.args[1], scopes)
                if code_text is None or message is None:
                    continue
                pattern = re.compile(
                    "^" + re.sub(r"\\\{[^}]*\\\}", ".+", re.escape(code_text)) + "$"
                )
                matched = [code for code in messages if pattern.match(code)]
                if not matched:
                    raise SystemExit(
                        f"{module}: openai_error code {code_text!r} is not in the table in "
                        "gateway/errors.py's docstring: add it there (and to GATEWAY_ADVICE)"
                    )
                for code in matched:
                    if message not in messages[code]:
                        messages[code].append(message)
    return [GatewayCode(s, t, c, tuple(messages[c])) for s, t, c in table]


def _md(text: str, *, in_table: bool = False) -> str:
    """Inline code for a message or hint (a double-backtick span if it holds backticks).

    Only inside a table does ``|`` need escaping (GitHub then unescapes it in code spans);
    elsewhere the backslash would show.
    """
    flat = text.replace("\n", " ")
    if in_table:
        flat = flat.replace("|", "\\|")
    return f"`` {flat} ``" if "`" in flat else f"`{flat}`"


def render(root: Path = ROOT) -> str:
    """The whole of docs/troubleshooting.md, from the packages under ``root``."""
    modules = list(_python_files(root))
    classes = error_classes(modules)
    entries = error_entries(modules)
    codes = gateway_codes(modules)
    missing = [c.code for c in codes if c.code not in GATEWAY_ADVICE]
    if missing:
        raise SystemExit(
            f"gateway codes without advice: {', '.join(missing)}: add them to GATEWAY_ADVICE "
            "in hpc/dev/troubledocs.py"
        )
    out = [
        "# Troubleshooting",
        "",
        f"<!-- GENERATED by `{REGENERATE}` from the code: do not edit by hand. -->",
        "",
        "Every error `mt` prints is two lines on stderr, `error: …` and `hint: …`, and exit "
        "code 1 (2 for a usage error). This page lists every such message in the code, "
        "grouped by the module that raises it, with what it means and what to do. Text in "
        "`{braces}` is filled in at run time (a path, a job id, a host). The gateway answers "
        "HTTP errors in OpenAI's shape; its codes are at the end.",
        "",
        "A test (tests/test_troubledocs.py) fails when this page is out of date: after adding "
        f"or changing an error, run `{REGENERATE}` and commit the result.",
        "",
        "## Error classes",
        "",
        "| class | meaning |",
        "| --- | --- |",
    ]
    out += [f"| `{name}` | {doc} |" for name, doc in classes.items()]
    by_module: dict[str, list[ErrorEntry]] = {}
    for entry in entries:
        by_module.setdefault(entry.module, []).append(entry)
    for module, module_entries in by_module.items():
        out += ["", f"## `{module}`", ""]
        for entry in module_entries:
            out.append(f"- **error:** {_md(entry.message)}")
            where = "the class itself" if entry.function.endswith("__init__") else entry.function
            meaning = classes.get(entry.error_class, "")
            out.append(f"  - *meaning:* `{entry.error_class}` ({where}): {meaning}")
            todo = entry.hint if entry.hint else "the message names what failed; fix that"
            out.append(f"  - *what to do:* {_md(todo) if entry.hint else todo}")
    out += [
        "",
        "## Gateway error codes",
        "",
        'Body: `{"error": {"message", "type", "param", "code"}}`. 429 and 503 carry '
        "`Retry-After`. After the first streamed byte an error arrives in-band as "
        '`data: {"error": …}` and no `[DONE]` follows.',
        "",
        "| status | code | message | what to do |",
        "| --- | --- | --- | --- |",
    ]
    for code in codes:
        shown = "<br>".join(_md(m, in_table=True) for m in code.messages) or "(set at run time)"
        out.append(
            f"| {code.status} {code.type} | `{code.code}` | {shown} | {GATEWAY_ADVICE[code.code]} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/troubleshooting.md, or with --check say whether it is up to date."""
    parser = argparse.ArgumentParser(prog="python -m hpc.dev.troubledocs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = parser.parse_args(argv)
    text = render()
    path = ROOT / DOC
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            sys.stderr.write(f"{DOC} is out of date: run `{REGENERATE}` and commit it\n")
            return 1
        return 0
    path.write_text(text, encoding="utf-8")
    sys.stderr.write(f"wrote {DOC} ({len(text.splitlines())} lines)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
