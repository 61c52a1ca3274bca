"""models.yaml aliases and fallbacks: clashes and dangling fallbacks name file, line, field."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import _errors, _write

from hpc.configfile import load_models
from hpc.spec import ModelsFile

BASE = """\
models:
  - name: big
    engine: vllm
    weights:
      source: org/big
    aliases: [{big_aliases}]
    fallbacks: [{big_fallbacks}]
  - name: small
    engine: llamacpp
    weights:
      source: /models/small
    aliases: [{small_aliases}]
static:
  - name: ext
    base_url: http://a.example.org/v1
    aliases: [{ext_aliases}]
"""


def _file(tmp_path: Path, **fields: str) -> Path:
    values = {"big_aliases": "", "big_fallbacks": "", "small_aliases": "", "ext_aliases": ""}
    values.update(fields)
    text = BASE
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return _write(tmp_path, text)


def test_aliases_and_fallbacks_load(tmp_path: Path) -> None:
    path = _file(
        tmp_path, big_aliases="large, default", big_fallbacks="tiny, ext", small_aliases="tiny"
    )
    models = load_models(path)
    big = models.get("big")
    assert big is not None
    assert big.aliases == ("large", "default")
    assert big.fallbacks == ("tiny", "ext")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"small_aliases": "big"},
            "models.yaml:12: models[1].aliases[0]: alias 'big' of models[1] ('small') is "
            "already the name of models[0] ('big')",
        ),
        (
            {"big_aliases": "ext"},
            "models.yaml:6: models[0].aliases[0]: alias 'ext' of models[0] ('big') is "
            "already the name of static[0] ('ext')",
        ),
        (
            {"big_aliases": "shared", "ext_aliases": "shared"},
            "models.yaml:16: static[0].aliases[0]: alias 'shared' of static[0] ('ext') is "
            "already an alias of models[0] ('big')",
        ),
        (
            {"big_fallbacks": "medium"},
            "models.yaml:7: models[0].fallbacks[0]: fallback 'medium' is no model name or "
            "alias in this file",
        ),
        (
            {"big_aliases": "large", "big_fallbacks": "large"},
            "models.yaml:7: models[0].fallbacks[0]: fallback 'large' is this entry itself",
        ),
    ],
    ids=["alias-is-a-name", "alias-is-a-static-name", "alias-twice", "dangling", "self"],
)
def test_a_clash_or_a_dangling_fallback_names_its_line(
    tmp_path: Path, fields: dict[str, str], expected: str
) -> None:
    assert _errors(_file(tmp_path, **fields)) == [expected]


def test_the_rule_holds_without_the_file_too() -> None:
    with pytest.raises(ValueError, match="fallback 'nope' is no model name"):
        ModelsFile.model_validate(
            {"static": [{"name": "a", "base_url": "http://h/v1", "fallbacks": ["nope"]}]}
        )
