"""hpc/sizing.py: the formula by hand, and docs/gpu-sizing.md's table is what it computes."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc import sizing

DOC = Path(__file__).resolve().parent.parent / "docs" / "gpu-sizing.md"
LLAMA_8B = next(s for s in sizing.COMMON if s.name == "Llama-3.1-8B")


def test_doc_table_is_the_computed_one() -> None:
    assert sizing.table() in DOC.read_text(encoding="utf-8"), (
        "docs/gpu-sizing.md's table differs from hpc/sizing.py: paste `python -m hpc.sizing`"
    )


def test_kv_cache_by_hand() -> None:
    # 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB per token.
    assert sizing.kv_cache_gib(LLAMA_8B, tokens=8192) == pytest.approx(1.0)
    assert sizing.kv_cache_gib(LLAMA_8B, tokens=8192, batch=16) == pytest.approx(16.0)
    assert sizing.kv_cache_gib(LLAMA_8B, tokens=8192, kv_bytes=1) == pytest.approx(0.5)


def test_weights_by_hand() -> None:
    assert sizing.weights_gib(8.0, 16) == pytest.approx(16e9 / 2**30)
    assert sizing.weights_gib(70.6, 4.85) == pytest.approx(70.6e9 * 4.85 / 8 / 2**30)


def test_total_adds_weights_cache_and_overhead() -> None:
    weights = sizing.weights_gib(LLAMA_8B.params_b, 16)
    expected = weights + 1.0 + sizing.OVERHEAD_FIXED_GIB + sizing.OVERHEAD_FRACTION * weights
    assert sizing.total_gib(LLAMA_8B, "BF16", tokens=8192) == pytest.approx(expected)


def test_unknown_quant_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        sizing.total_gib(LLAMA_8B, "Q3_MADE_UP", tokens=1)
