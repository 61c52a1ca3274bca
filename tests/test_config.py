"""models.yaml and site.yaml: every kind of bad input names its file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc.configfile import load_models
from hpc.errors import ConfigError
from hpc.site import load_site, mt_home

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"

# Two models; line 12 is the second model's resources (the tests below edit that line).
GOOD = """\
models:
  - name: Qwen3-Coder-30B-A3B
    engine: vllm
    weights:
      source: Qwen/Qwen3-Coder-30B-A3B-Instruct
    resources:
      gpus: 2
  - name: gemma-3-270m
    engine: llamacpp
    weights: {source: /models/gemma, quant: Q4_K_M}
    resources:
      gpus: 0
"""


def _write(tmp_path: Path, text: str, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _with_line_12(text: str) -> str:
    lines = GOOD.splitlines()
    assert lines[11] == "      gpus: 0"
    lines[11] = text
    return "\n".join(lines) + "\n"


def _errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_models(path)
    assert caught.value.path == path
    assert caught.value.hint
    lines = [str(issue) for issue in caught.value.issues]
    assert str(caught.value) == "\n".join(lines)
    return lines


def test_the_good_file_loads(tmp_path: Path) -> None:
    models = load_models(_write(tmp_path, GOOD))
    assert models.names() == ["Qwen3-Coder-30B-A3B", "gemma-3-270m"]
    gemma = models.get("gemma-3-270m")
    assert gemma is not None
    assert gemma.weights.quant == "Q4_K_M"


def test_a_typo_is_an_unknown_field_on_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, _with_line_12("      gpu: 2"))
    assert _errors(path) == [
        "models.yaml:12: models[1].resources.gpu: unknown field (check the spelling)"
    ]


def test_a_constraint(tmp_path: Path) -> None:
    path = _write(tmp_path, _with_line_12("      gpus: -1"))
    assert _errors(path) == [
        "models.yaml:12: models[1].resources.gpus: Input should be greater than or equal to 0"
    ]


def test_a_wrong_type(tmp_path: Path) -> None:
    path = _write(tmp_path, _with_line_12("      gpus: two"))
    assert _errors(path) == [
        "models.yaml:12: models[1].resources.gpus: "
        "Input should be a valid integer, unable to parse string as an integer"
    ]


def test_a_wrong_choice_and_a_missing_field(tmp_path: Path) -> None:
    text = GOOD.replace("    engine: llamacpp\n", "    engine: ollama\n")
    text = text.replace("    engine: vllm\n", "")
    assert _errors(_write(tmp_path, text)) == [
        "models.yaml:2: models[0].engine: Field required",
        "models.yaml:8: models[1].engine: Input should be 'vllm' or 'llamacpp'",
    ]


def test_every_bad_field_is_reported_once(tmp_path: Path) -> None:
    text = """\
# comments and blank lines count as lines

models:
  - name: has space
    engine: vllm
    weights: {source: org/x, quant: "Q4 K"}
    runtime:
      kind: apptainer
    startup_timeout_s: 0
static:
  - name: remote
    base_url: ftp://example.org/v1
"""
    assert _errors(_write(tmp_path, text)) == [
        "models.yaml:4: models[0].name: String should match pattern "
        "'^[A-Za-z0-9][A-Za-z0-9._:+-]*$'",
        "models.yaml:6: models[0].weights.quant: String should match pattern '^[A-Za-z0-9_]+$'",
        "models.yaml:7: models[0].runtime: Value error, runtime.kind 'apptainer' needs an image",
        "models.yaml:9: models[0].startup_timeout_s: Input should be greater than 0",
        "models.yaml:12: static[0].base_url: String should match pattern '^https?://[^\\s]+$'",
    ]


def test_yaml_syntax_names_the_line(tmp_path: Path) -> None:
    text = GOOD.replace("    engine: llamacpp\n", "    engine: llamacpp: cpu\n")
    assert _errors(_write(tmp_path, text)) == [
        "models.yaml:9: YAML syntax: mapping values are not allowed here"
    ]


def test_a_tab_in_the_indentation(tmp_path: Path) -> None:
    text = GOOD.replace("      gpus: 0\n", "\t  gpus: 0\n")
    (line,) = _errors(_write(tmp_path, text))
    assert line.startswith("models.yaml:12: YAML syntax: ")


def test_duplicate_yaml_keys(tmp_path: Path) -> None:
    text = GOOD.replace("      gpus: 2\n", "      gpus: 2\n      cpus: 8\n      gpus: 4\n")
    assert _errors(_write(tmp_path, text)) == [
        "models.yaml:9: models[0].resources.gpus: duplicate key (the earlier value would be lost)"
    ]


def test_duplicate_model_names_across_models_and_static(tmp_path: Path) -> None:
    text = (
        GOOD
        + """\
static:
  - name: other
    base_url: http://a.example.org/v1
  - name: gemma-3-270m
    base_url: http://b.example.org/v1
"""
    )
    assert _errors(_write(tmp_path, text)) == [
        "models.yaml:16: static[1].name: duplicate model name 'gemma-3-270m' (first in models[1])"
    ]


def test_duplicate_model_names_within_models(tmp_path: Path) -> None:
    text = GOOD.replace("  - name: gemma-3-270m\n", "  - name: Qwen3-Coder-30B-A3B\n")
    assert _errors(_write(tmp_path, text)) == [
        "models.yaml:8: models[1].name: duplicate model name 'Qwen3-Coder-30B-A3B' "
        "(first in models[0])"
    ]


def test_a_missing_file_has_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    with pytest.raises(ConfigError) as caught:
        load_models(path)
    assert str(caught.value) == "models.yaml: file not found"
    assert caught.value.hint is not None
    assert str(path) in caught.value.hint
    assert "docs/examples" in caught.value.hint


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_a_file_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    assert _errors(_write(tmp_path, text)) == ["models.yaml:1: the file must hold a mapping"]


def test_an_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    assert load_models(_write(tmp_path, "# nothing yet\n")).names() == []


def test_an_unknown_tag_names_the_line(tmp_path: Path) -> None:
    text = GOOD.replace("      gpus: 0\n", "      gpus: !gpus 0\n")
    (line,) = _errors(_write(tmp_path, text))
    assert line.startswith("models.yaml:12: models[1].resources.gpus: YAML: ")
    assert "!gpus" in line


def test_text_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_bytes(GOOD.encode().replace(b"gemma-3-270m", b"gemma-\xff"))
    assert _errors(path) == ["models.yaml:8: not UTF-8 text"]


def test_anchors_and_merge_keys_share_settings(tmp_path: Path) -> None:
    text = """\
models:
  - name: big
    engine: vllm
    weights: {source: org/big}
    resources: &a100x2
      gpus: 2
      gpu_type: a100
      cpus: 16
  - name: bigger
    engine: vllm
    weights: {source: org/bigger}
    resources:
      <<: *a100x2
      gpus: 4
  - name: same
    engine: vllm
    weights: {source: org/same}
    resources: *a100x2
"""
    models = load_models(_write(tmp_path, text))
    big, bigger, same = models.models
    assert (bigger.resources.gpus, bigger.resources.gpu_type, bigger.resources.cpus) == (
        4,
        "a100",
        16,
    )
    assert same.resources == big.resources


def test_a_bad_field_merged_from_an_anchor_names_the_anchors_line(tmp_path: Path) -> None:
    text = """\
models:
  - name: big
    engine: vllm
    weights: {source: org/big}
    resources: &a100x2
      gpus: 2
  - name: bigger
    engine: vllm
    weights: {source: org/bigger}
    resources:
      gpus: 4
      <<: [*a100x2, {cpu: 3}]
"""
    assert _errors(_write(tmp_path, text)) == [
        "models.yaml:12: models[1].resources.cpu: unknown field (check the spelling)"
    ]


# -- site.yaml ------------------------------------------------------------------------------

SITE = """\
registry_dir: /shared/mt/registry
slurm:
  partition: gpu
  account: nlp-lab
  modules: [apptainer/1.3]
  image_dir: /shared/containers
"""


def test_site_defaults_live_under_mt_home(tmp_path: Path) -> None:
    home = tmp_path / "state"
    site = load_site(None, environ={"MT_HOME": str(home)})
    assert site.home == home
    assert site.registry_dir == home / "registry"
    assert site.log_dir == home / "logs"
    assert site.jobs_dir == home / "jobs"
    assert site.config.slurm.partition is None
    assert site.config.gateway.host == "127.0.0.1"


def test_site_yaml_in_mt_home_is_read(tmp_path: Path) -> None:
    home = tmp_path / "state"
    home.mkdir()
    _write(home, SITE, "site.yaml")
    site = load_site(None, environ={"MT_HOME": str(home)})
    assert site.registry_dir == Path("/shared/mt/registry")
    assert site.config.slurm.partition == "gpu"
    assert site.config.slurm.account == "nlp-lab"
    assert site.config.slurm.modules == ("apptainer/1.3",)
    assert site.config.slurm.image_dir == Path("/shared/containers")


def test_mt_site_wins_over_mt_home_and_an_explicit_path_wins_over_both(tmp_path: Path) -> None:
    home = tmp_path / "state"
    home.mkdir()
    _write(home, "slurm: {partition: from-home}\n", "site.yaml")
    elsewhere = _write(tmp_path, "slurm: {partition: from-mt-site}\n", "other.yaml")
    explicit = _write(tmp_path, "slurm: {partition: explicit}\n", "explicit.yaml")
    environ = {"MT_HOME": str(home), "MT_SITE": str(elsewhere)}
    assert load_site(None, environ=environ).config.slurm.partition == "from-mt-site"
    assert load_site(explicit, environ=environ).config.slurm.partition == "explicit"
    assert load_site(None, environ={"MT_HOME": str(home)}).config.slurm.partition == "from-home"


def test_the_environ_given_is_the_only_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("MT_SITE", str(tmp_path / "no-such-site.yaml"))
    # os.environ has MT_HOME (conftest) and a broken MT_SITE; neither is used.
    site = load_site(None, environ={})
    assert site.home == tmp_path / "user" / ".mt"
    assert mt_home({}) == tmp_path / "user" / ".mt"
    assert mt_home({"MT_HOME": "~/state"}) == tmp_path / "user" / "state"


def test_relative_site_paths_are_under_mt_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "state"
    site_file = _write(tmp_path, "registry_dir: reg\nlog_dir: ~/mt-logs\n", "site.yaml")
    site = load_site(site_file, environ={"MT_HOME": str(home)})
    assert site.registry_dir == home / "reg"
    assert site.log_dir == tmp_path / "user" / "mt-logs"


def test_a_missing_mt_site_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_site(None, environ={"MT_SITE": str(tmp_path / "site.yaml")})
    assert str(caught.value) == "site.yaml: file not found"


def test_a_bad_site_field_names_its_line(tmp_path: Path) -> None:
    text = SITE.replace("  account:", "  acount:") + "gateway: {port: 0}\n"
    path = _write(tmp_path, text, "site.yaml")
    with pytest.raises(ConfigError) as caught:
        load_site(path, environ={})
    assert [str(issue) for issue in caught.value.issues] == [
        "site.yaml:4: slurm.acount: unknown field (check the spelling)",
        "site.yaml:7: gateway.port: Input should be greater than 0",
    ]


# -- the samples ----------------------------------------------------------------------------


def test_the_sample_models_yaml_loads() -> None:
    models = load_models(EXAMPLES / "models.yaml")
    vllm = [m for m in models.models if m.engine == "vllm"]
    llamacpp = [m for m in models.models if m.engine == "llamacpp"]
    assert vllm
    assert llamacpp
    assert models.static
    big = vllm[0]
    assert big.resources.gpus == 2
    assert big.resources.gpu_type == "a100"
    assert (big.runtime.kind, big.runtime.gpu_flag) == ("apptainer", "--nv")
    assert big.slurm.partition
    assert big.slurm.account
    assert llamacpp[0].weights.quant == "Q4_K_M"


def test_the_sample_site_yaml_loads() -> None:
    site = load_site(EXAMPLES / "site.yaml", environ={})
    slurm = site.config.slurm
    assert slurm.partition
    assert slurm.account
    assert slurm.modules
    assert slurm.image_dir is not None
    assert site.config.registry_dir is not None
    assert site.registry_dir.is_absolute()


def test_on_demand_block_loads_and_names_its_bad_fields(tmp_path: Path) -> None:
    models = load_models(
        _write(
            tmp_path,
            _with_line_12("      gpus: 0\n    on_demand: {idle_ttl_s: 5, start_deadline_s: 60}"),
        )
    )
    gemma = models.get("gemma-3-270m")
    assert gemma is not None and gemma.on_demand is not None
    assert (gemma.on_demand.idle_ttl_s, gemma.on_demand.max_replicas) == (5, 1)
    assert gemma.on_demand.start_deadline_s == 60
    qwen = models.get("Qwen3-Coder-30B-A3B")
    assert qwen is not None and qwen.on_demand is None

    path = _write(
        tmp_path, _with_line_12("      gpus: 0\n    on_demand: {idle_ttl: 5, max_replicas: 0}")
    )
    assert _errors(path) == [
        "models.yaml:13: models[1].on_demand.max_replicas: "
        "Input should be greater than or equal to 1",
        "models.yaml:13: models[1].on_demand.idle_ttl: unknown field (check the spelling)",
    ]
