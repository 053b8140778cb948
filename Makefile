# The two set-up commands of the README: `make demo` and `make test`. Each creates the
# environment at .venv (from constraints.txt, torch pinned first so pip never swaps it) when it
# is missing or older than the project's dependency files.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: env demo test test-gdino lint bench

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt torch torchvision
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(VENV)/bin/python scripts/check_env.py
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ifadapter demo --out out/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

# groundingdino-py needs transformers < 5: its own environment (.venv-gdino) and test
test-gdino:
	scripts/gdino_env.sh

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.adapter_step
	$(VENV)/bin/python -m benchmarks.annotate_engine
	$(VENV)/bin/python -m benchmarks.caption_requests
	$(VENV)/bin/python -m benchmarks.evaluation_throughput
