# The README's commands: `make demo` (set up, index the sample catalog, search it) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SAMPLE := src/lookalike/data/sample

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch and torchvision first, pinned, so nothing else pulls another build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lookalike build $(SAMPLE)/catalog.csv -o demo-index --force
	$(VENV)/bin/lookalike search demo-index $(SAMPLE)/queries/*.jpg -k 3

test: setup
	$(PY) -m pytest -q --durations=10

bench: setup
	$(PY) benchmarks/bench_build.py

clean:
	rm -rf demo-index .pytest_cache
