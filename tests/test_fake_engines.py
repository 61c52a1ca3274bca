"""Every test file that uses a fake engine is listed in docs/testing.md's table, with why.

The rule (issue 17): no test that could use the real engine still uses a fake one; the fake
stays for what a real engine cannot be made to do on cue (failures, timing, exact counts,
what the engine received). The table says which test keeps which engine; this check keeps
the table true: a new file using a fake without a row fails, as does a row naming a test
that does not exist, or a "fake" row for a file that no longer uses one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TABLE = TESTS.parent / "docs" / "testing.md"
THE_REST = "the rest"

# What using a fake engine looks like in a test file: the in-process fake (bench.fakeengine,
# imported as fake_upstream), it as a process (fakeengineproc, `-m bench.fakeengine`, the
# `engine_url` fixture) or the job wrapper's fake engine (tests/fake_engine.py).
_FAKE_USE = re.compile(
    r"\bfake_upstream\b|\bFakeUpstream\b|\bfakeengineproc\b|\bbench\.fakeengine\b"
    r"|\bfake_engine\.py\b|^\s*(?:async\s+)?def\s+test_\w+\([^)]*\bengine_url\b",
    re.MULTILINE,
)
_TEST_DEF = re.compile(r"^\s*(?:async\s+)?def\s+(test_\w+)\(", re.MULTILINE)
_ROW = re.compile(r"^\| `(tests/[^`]+)` \| (.+?) \| (.+?) \| (.+) \|$", re.MULTILINE)
_ENGINES = ("real", "fake", "fake, to convert", "none")


def uses_a_fake(source: str) -> bool:
    """Whether a test file's source uses one of the fake engines."""
    return _FAKE_USE.search(source) is not None


def fake_using_functions(source: str) -> set[str]:
    """The test functions whose own code uses a fake engine (not through a helper)."""
    tree = ast.parse(source)
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith("test_")
        and uses_a_fake(ast.get_source_segment(source, node) or "")
    }


def problems(tests_dir: Path, table: str) -> list[str]:
    """What is wrong between the test files under ``tests_dir`` and the table's rows."""
    found: list[str] = []
    rows: dict[str, list[tuple[str, str]]] = {}
    for file, tests, engine, _why in _ROW.findall(table):
        if engine not in _ENGINES:
            found.append(f"{file}: engine {engine!r} is none of {', '.join(_ENGINES)}")
        rows.setdefault(Path(file).name, []).append((tests, engine))
    for name, entries in sorted(rows.items()):
        path = tests_dir / name
        if not path.is_file():
            found.append(f"tests/{name}: listed in {TABLE.name} but there is no such file")
            continue
        source = path.read_text(encoding="utf-8")
        defined = set(_TEST_DEF.findall(source))
        named: list[str] = []
        for tests, _engine in entries:
            if tests != THE_REST:
                named += [t.strip().strip("`") for t in tests.split(",")]
        for test in named:
            if test not in defined:
                found.append(f"tests/{name}: the table names {test}, which the file lacks")
        if len(named) != len(set(named)):
            found.append(f"tests/{name}: a test is named in two rows")
        using = uses_a_fake(source)
        if using and not any(engine.startswith("fake") for _, engine in entries):
            found.append(f"tests/{name}: uses a fake engine but no row of it says fake")
        if not using and any(engine.startswith("fake") for _, engine in entries):
            found.append(f"tests/{name}: a row says fake but the file uses no fake engine")
        rest = next((engine for tests, engine in entries if tests == THE_REST), None)
        engine_of = {
            t.strip().strip("`"): engine
            for tests, engine in entries
            if tests != THE_REST
            for t in tests.split(",")
        }
        for test in sorted(fake_using_functions(source)):
            engine = engine_of.get(test, rest)
            if engine is not None and not engine.startswith("fake"):
                found.append(f"tests/{name}: {test} uses a fake engine, its row says {engine}")
        if using and not any(tests == THE_REST for tests, _ in entries):
            for test in sorted(defined - set(named)):
                found.append(f"tests/{name}: {test} is in no row (and no row is {THE_REST!r})")
    for path in sorted(tests_dir.glob("test_*.py")):
        if path.name in rows or path.name == Path(__file__).name:
            continue
        if uses_a_fake(path.read_text(encoding="utf-8")):
            found.append(
                f"tests/{path.name}: uses a fake engine without a row in docs/{TABLE.name}: "
                "use the real engine (tests/realengine.py), or add a row saying why not"
            )
    return found


def test_every_file_using_a_fake_engine_is_in_the_table_with_its_tests() -> None:
    assert problems(TESTS, TABLE.read_text(encoding="utf-8")) == []


def test_the_check_catches_an_unlisted_file_a_missing_test_and_a_stale_row(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_new.py").write_text("from fake_upstream import FakeUpstream\n")
    (tmp_path / "test_real.py").write_text("def test_one(real_engine):\n    pass\n")
    (tmp_path / "test_proc.py").write_text("def test_bench(engine_url: str):\n    pass\n")
    (tmp_path / "test_mixed.py").write_text(
        "from fake_upstream import FakeUpstream\n\n\n"
        "async def test_cut():\n    async with FakeUpstream():\n        pass\n\n\n"
        "async def test_happy(real_engine):\n    async with FakeUpstream():\n        pass\n"
    )
    table = (
        "| `tests/test_mixed.py` | `test_cut` | fake | failure: a cut |\n"
        "| `tests/test_mixed.py` | the rest | real | converted |\n"
        "| `tests/test_real.py` | `test_two` | real | converted |\n"
        "| `tests/test_real.py` | the rest | fake | stale |\n"
        "| `tests/test_gone.py` | the rest | fake | gone |\n"
    )
    found = problems(tmp_path, table)
    assert found == [
        "tests/test_gone.py: listed in testing.md but there is no such file",
        "tests/test_mixed.py: test_happy uses a fake engine, its row says real",
        "tests/test_real.py: the table names test_two, which the file lacks",
        "tests/test_real.py: a row says fake but the file uses no fake engine",
        "tests/test_new.py: uses a fake engine without a row in docs/testing.md: "
        "use the real engine (tests/realengine.py), or add a row saying why not",
        "tests/test_proc.py: uses a fake engine without a row in docs/testing.md: "
        "use the real engine (tests/realengine.py), or add a row saying why not",
    ]
    listed = "| `tests/test_new.py` | the rest | fake | failure: cuts |\n"
    (tmp_path / "test_real.py").unlink()
    (tmp_path / "test_proc.py").unlink()
    (tmp_path / "test_mixed.py").unlink()
    assert problems(tmp_path, listed) == []
