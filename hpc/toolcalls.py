"""Which engine flags a chat model needs to answer requests with ``tools``.

Agents and UIs send tools with every chat (Open WebUI about 40, Claude Code a dozen); an
engine started without tool calling answers them 400 (vLLM) or ignores them (llama.cpp's
servers without a tool-aware chat template). `mt submit` warns, before the job is queued,
when a spec serves a chat model without the flags (docs/clients.md lists them); it is a
warning, not an error: a model may well be meant for plain chat.
"""

from __future__ import annotations

from hpc.spec import ModelSpec

# vLLM: a pooling model (embeddings, scores, rewards) answers no chat.
_VLLM_POOLING_TASKS = frozenset({"embed", "embedding", "score", "classify", "reward", "pooling"})
# llama.cpp: flags that make llama-server (or llama-cpp-python) serve embeddings or reranking.
_LLAMACPP_NOT_CHAT = ("--embedding", "--embeddings", "--reranking", "--rerank")
# llama-cpp-python's chat formats that parse tool calls.
_TOOL_CHAT_FORMATS = frozenset(
    {"chatml-function-calling", "functionary", "functionary-v1", "functionary-v2"}
)


def _value(args: tuple[str, ...], name: str) -> str | None:
    """The value of ``name`` (``--x v`` or ``--x=v``) in ``args``; the last one wins."""
    found = None
    for at, arg in enumerate(args):
        if arg == name and at + 1 < len(args):
            found = args[at + 1]
        elif arg.startswith(name + "="):
            found = arg[len(name) + 1 :]
    return found


def _has(args: tuple[str, ...], name: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in args)


def serves_chat(spec: ModelSpec) -> bool:
    """True unless the engine args make it an embedding, scoring or reranking model."""
    args = spec.engine_args
    if spec.engine == "vllm":
        task = _value(args, "--task") or ""
        return task not in _VLLM_POOLING_TASKS and _value(args, "--runner") != "pooling"
    return not any(_has(args, flag) for flag in _LLAMACPP_NOT_CHAT)


def missing_tool_flags(spec: ModelSpec) -> str | None:
    """What ``spec``'s engine args lack for tool calls, as a warning line; None if nothing."""
    if not serves_chat(spec):
        return None
    args = spec.engine_args
    if spec.engine == "vllm":
        missing = [
            flag
            for flag in ("--enable-auto-tool-choice", "--tool-call-parser")
            if not _has(args, flag)
        ]
        if not missing:
            return None
        return (
            f"{spec.name}: vLLM answers requests with tools 400 without "
            f"{' and '.join(missing)} in engine_args (e.g. --enable-auto-tool-choice "
            "--tool-call-parser hermes; the parser depends on the model, see docs/clients.md)"
        )
    chat_format = _value(args, "--chat_format")
    if (_has(args, "--jinja") and not _has(args, "--no-jinja")) or chat_format in (
        _TOOL_CHAT_FORMATS
    ):
        return None
    if chat_format is not None:
        why = f"llama-cpp-python's --chat_format {chat_format} parses no tool calls"
        fix = "--chat_format chatml-function-calling"
    else:
        why = "tool calls need llama-server's --jinja (older builds and images lack it)"
        fix = "--jinja (llama-server) or --chat_format chatml-function-calling (llama-cpp-python)"
    return f"{spec.name}: {why}; add {fix} to engine_args (see docs/clients.md)"
