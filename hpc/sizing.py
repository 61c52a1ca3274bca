"""GPU memory a model needs: weights + KV cache + overhead (the table in docs/gpu-sizing.md).

    weights  = params * bits_per_weight / 8
    kv_cache = 2 (K and V) * layers * kv_heads * head_dim * kv_bytes * tokens * batch
    total    = weights + kv_cache + overhead (CUDA context, activations, allocator slack)

The numbers are estimates for choosing ``resources.gpus`` and a GPU type, not promises: vLLM
takes ``--gpu-memory-utilization`` of the card up front and fills the rest with KV cache,
llama.cpp allocates ``--ctx-size`` tokens of cache when it starts. Sizes are GiB (2**30 bytes),
the unit ``nvidia-smi`` reports.

    python -m hpc.sizing        # print the doc's table
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30

# Effective bits per weight, scales and zero-points included (a Q4_K_M GGUF is not 4.0).
BITS_PER_WEIGHT: dict[str, float] = {
    "BF16": 16.0,
    "FP8": 8.0,
    "Q8_0": 8.5,
    "Q4_K_M": 4.85,
    "AWQ-INT4": 4.25,
}

# A fixed CUDA context and activation workspace, plus allocator slack proportional to weights.
OVERHEAD_FIXED_GIB = 1.0
OVERHEAD_FRACTION = 0.05


@dataclass(frozen=True)
class Shape:
    """What the formula needs from a model's config.json."""

    name: str
    params_b: float  # total parameters in billions (an MoE model's total, not its active)
    layers: int  # num_hidden_layers
    kv_heads: int  # num_key_value_heads (GQA): far fewer than attention heads
    head_dim: int  # head_dim, else hidden_size / num_attention_heads


# From each model's published config.json.
COMMON: tuple[Shape, ...] = (
    Shape("Gemma-3-270M", 0.27, 18, 1, 256),
    Shape("Qwen2.5-7B", 7.6, 28, 4, 128),
    Shape("Llama-3.1-8B", 8.0, 32, 8, 128),
    Shape("Qwen3-Coder-30B-A3B", 30.5, 48, 4, 128),
    Shape("Qwen2.5-32B", 32.8, 64, 8, 128),
    Shape("Llama-3.1-70B", 70.6, 80, 8, 128),
)


def weights_gib(params_b: float, bits_per_weight: float) -> float:
    """Memory of the weights alone."""
    return params_b * 1e9 * bits_per_weight / 8 / GIB


def kv_cache_gib(shape: Shape, tokens: int, batch: int = 1, kv_bytes: float = 2.0) -> float:
    """KV cache for ``batch`` sequences of ``tokens`` each (2 bytes: BF16/FP16 cache)."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_bytes * tokens * batch / GIB


def total_gib(
    shape: Shape, quant: str, tokens: int, batch: int = 1, kv_bytes: float = 2.0
) -> float:
    """Weights + KV cache + overhead: what the GPUs must hold together."""
    weights = weights_gib(shape.params_b, BITS_PER_WEIGHT[quant])
    overhead = OVERHEAD_FIXED_GIB + OVERHEAD_FRACTION * weights
    return weights + kv_cache_gib(shape, tokens, batch, kv_bytes) + overhead


def table(
    shapes: tuple[Shape, ...] = COMMON,
    quants: tuple[str, ...] = ("BF16", "FP8", "Q4_K_M"),
    tokens: int = 8192,
    batches: tuple[int, ...] = (1, 16),
) -> str:
    """The Markdown table of docs/gpu-sizing.md (tests/test_sizing.py checks they match)."""
    header = ["model", "quant", "weights", f"KV / {tokens} tokens"]
    header += [f"total, batch {b}" for b in batches]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for shape in shapes:
        kv = kv_cache_gib(shape, tokens)
        for quant in quants:
            cells = [
                shape.name,
                quant,
                f"{weights_gib(shape.params_b, BITS_PER_WEIGHT[quant]):.1f}",
                f"{kv:.2f}",
            ]
            cells += [f"{total_gib(shape, quant, tokens, b):.1f}" for b in batches]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
