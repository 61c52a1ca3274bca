"""The catalog: one answer to "which names are served" for /v1/models, `mt models`, `mt export`."""

from __future__ import annotations

from test_swappool_units import _record

from gateway.routes import build_routes
from hpc.catalog import catalog, served_models
from hpc.spec import ModelsFile

MODELS = ModelsFile.model_validate(
    {
        "models": [
            {
                "name": "big",
                "engine": "vllm",
                "weights": {"source": "org/big"},
                "aliases": ["large"],
                "fallbacks": ["tiny"],
            },
            {"name": "cold", "engine": "vllm", "weights": {"source": "org/cold"}},
            {"name": "a", "engine": "vllm", "weights": {"source": "org/a"}},
            {"name": "b", "engine": "vllm", "weights": {"source": "org/b"}},
        ],
        "pools": [{"name": "pool", "models": ["a", "b"]}],
        "static": [{"name": "small", "base_url": "http://h/v1", "aliases": ["tiny"]}],
    }
)


RECORDS = [
    _record("big", "ready"),
    _record("pool", "ready", ("a", "b")),
    _record("cold", "pending"),
    _record("job-only", "ready"),
]


def test_mt_models_and_the_gateway_agree_on_every_routable_name() -> None:
    """The names with an endpoint in `mt models` are exactly /v1/models' names."""
    listed = sorted(m.name for m in served_models(MODELS, RECORDS) if m.endpoints)
    assert listed == build_routes(RECORDS, MODELS, {}).names()
    assert "large" in listed and "tiny" in listed  # aliases, which `mt models` used to miss


def test_aliases_name_their_model_and_share_its_endpoints() -> None:
    rows = {m.name: m for m in served_models(MODELS, RECORDS)}
    assert rows["large"].source == "alias" and rows["large"].alias_of == "big"
    assert rows["large"].endpoints == rows["big"].endpoints
    assert rows["large"].engine == "vllm"
    assert rows["tiny"].alias_of == "small"


def test_starting_pools_and_fallbacks() -> None:
    served = catalog(MODELS, RECORDS)
    assert served.starting == {"cold"}
    assert served.pools == {"a": "pool", "b": "pool"}
    assert served.fallbacks == {"big": ("tiny",)}
    assert [m.name for m in served.models] == [
        "big",
        "cold",
        "a",
        "b",
        "small",
        "job-only",
        "large",
        "tiny",
    ]
