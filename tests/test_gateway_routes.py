"""The route table: ready records and static backends route; others are known or unknown."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import SecretStr

from gateway.routes import build_routes
from hpc.registry import Record, State, new_nonce
from hpc.spec import ModelsFile, StaticBackend


def _record(model: str, state: State, port: int, key: str = "mtj-k") -> Record:
    return Record(
        backend="local",
        job_id=new_nonce(),
        nonce=new_nonce(),
        model=model,
        engine="llamacpp",
        state=state,
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key=SecretStr(key),
    )


def _models(*, specs: Sequence[str] = (), static: Sequence[StaticBackend] = ()) -> ModelsFile:
    return ModelsFile.model_validate(
        {
            "models": [
                {"name": name, "engine": "llamacpp", "weights": {"source": "org/repo"}}
                for name in specs
            ],
            "static": [s.model_dump() for s in static],
        }
    )


def test_only_ready_records_route_and_carry_their_job_key() -> None:
    table = build_routes(
        [
            _record("a", "ready", 1001, key="mtj-one"),
            _record("b", "starting", 1002),
            _record("c", "gone", 1003),
            _record("d", "failed", 1004),
        ],
        None,
        {},
    )
    assert table.names() == ["a"]
    (upstream,) = table.pick("a")
    assert upstream.api_key == "mtj-one"
    assert upstream.url("/chat/completions") == "http://127.0.0.1:1001/v1/chat/completions"
    assert "mtj-one" not in repr(upstream)
    assert table.is_known("b")
    assert table.is_starting("b")
    assert not table.is_known("c")
    assert not table.is_known("d")
    assert not table.is_known("zzz")


def test_pick_rotates_round_robin_over_replicas() -> None:
    table = build_routes(
        [_record("m", "ready", 1001), _record("m", "ready", 1002), _record("m", "ready", 1003)],
        None,
        {},
    )
    firsts = [table.pick("m")[0].base_url for _ in range(6)]
    ports = [url.split(":")[2].split("/")[0] for url in firsts]
    assert ports == ["1001", "1002", "1003", "1001", "1002", "1003"]
    # Every pick still lists every replica, so the others are there to fall back on.
    assert {u.base_url for u in table.pick("m")} == {u.base_url for u in table.upstreams("m")}
    assert len(table.pick("m")) == 3


def test_configured_names_are_known_but_not_routable() -> None:
    table = build_routes([], _models(specs=["qwen"]), {})
    assert table.names() == []
    assert table.is_known("qwen")
    assert not table.is_starting("qwen")
    assert table.pick("qwen") == ()


def test_static_backends_route_with_the_key_from_their_env_var() -> None:
    static = [
        StaticBackend(name="ext", base_url="http://127.0.0.1:9/v1", api_key_env="EXT_KEY"),
        StaticBackend(name="open", base_url="http://127.0.0.1:10/v1"),
    ]
    table = build_routes([], _models(static=static), {"EXT_KEY": "sk-ext"})
    assert table.names() == ["ext", "open"]
    assert table.pick("ext")[0].api_key == "sk-ext"
    assert table.pick("open")[0].api_key is None
    assert table.warnings == ()


def test_a_static_backend_whose_env_var_is_unset_warns() -> None:
    static = [StaticBackend(name="ext", base_url="http://127.0.0.1:9/v1", api_key_env="EXT_KEY")]
    table = build_routes([], _models(static=static), {})
    assert table.pick("ext")[0].api_key is None
    assert any("EXT_KEY" in w for w in table.warnings)


def test_ready_records_and_static_backends_of_one_name_are_replicas() -> None:
    static = [StaticBackend(name="m", base_url="http://127.0.0.1:9/v1")]
    table = build_routes([_record("m", "ready", 1001)], _models(static=static), {})
    assert len(table.upstreams("m")) == 2
