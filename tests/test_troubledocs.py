"""docs/troubleshooting.md is generated from the code: it must match, and it must notice change."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hpc.dev import troubledocs

REPO = Path(__file__).resolve().parent.parent


def test_committed_doc_is_up_to_date() -> None:
    committed = (REPO / troubledocs.DOC).read_text(encoding="utf-8")
    assert committed == troubledocs.render(), (
        f"{troubledocs.DOC} is out of date with the code's error messages: "
        f"run `{troubledocs.REGENERATE}` and commit docs/troubleshooting.md"
    )


def test_check_mode_agrees() -> None:
    assert troubledocs.main(["--check"]) == 0


def _copy_packages(tmp_path: Path) -> Path:
    for package in troubledocs.PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package)
    return tmp_path


def test_a_new_error_and_its_hint_appear(tmp_path: Path) -> None:
    root = _copy_packages(tmp_path)
    target = root / "hpc" / "job" / "plan.py"
    target.write_text(
        target.read_text(encoding="utf-8")
        + "\n\ndef _brand_new(name: str) -> None:\n"
        + "    from hpc.errors import SlurmError\n"
        + "    raise SlurmError(f'the frobnicator refused {name}', hint='unfrob ' + 'it first')\n",
        encoding="utf-8",
    )
    text = troubledocs.render(root)
    assert text != troubledocs.render()
    assert "`the frobnicator refused {name}`" in text
    assert "`unfrob it first`" in text
    assert troubledocs._md("`ssh` is not installed here") == "`` `ssh` is not installed here ``"
    assert "`SlurmError` (_brand_new)" in text


def test_every_mt_error_raise_is_listed() -> None:
    # Cross-check with a plain text search: each literal MTError-tree message that starts a
    # `raise X("...` line in the code appears in the doc.
    text = troubledocs.render()
    classes = troubledocs.error_classes(list(troubledocs._python_files(REPO)))
    for package in troubledocs.PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for line in path.read_text(encoding="utf-8").splitlines():
                stripped = line.strip()
                for name in classes:
                    opener = f'raise {name}("'
                    if stripped.startswith(opener):
                        message = stripped[len(opener) :].split('"', 1)[0]
                        if "\\" in message or "{" in message:
                            continue  # escapes and f-strings: the ast tests cover them
                        assert troubledocs._md(message) in text, f"{path}: {message}"


def test_a_gateway_code_outside_the_table_is_refused(tmp_path: Path) -> None:
    root = _copy_packages(tmp_path)
    routes = root / "gateway" / "routes.py"
    routes.write_text(
        routes.read_text(encoding="utf-8")
        + "\n\ndef _teapot() -> object:\n"
        + "    from gateway.errors import openai_error\n"
        + "    return openai_error(418, 'short and stout', 'invalid_request_error', 'teapot')\n",
        encoding="utf-8",
    )
    with pytest.raises(SystemExit, match="'teapot' is not in the table"):
        troubledocs.render(root)


def test_every_gateway_code_has_advice() -> None:
    codes = troubledocs.gateway_codes(list(troubledocs._python_files(REPO)))
    assert {c.code for c in codes} == set(troubledocs.GATEWAY_ADVICE)
    assert {c.status for c in codes} >= {400, 401, 403, 404, 429, 502, 503, 504}
