# The README's commands: `make demo` (set up, index the sample catalog, search it, serve it) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SAMPLE := src/lookalike/data/sample
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PORT ?= 8000

.PHONY: setup demo test bench clean

setup: $(STAMP) $(CHROMIUM)

# The browser tests drive Debian's Chromium (never a downloaded browser).
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null

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
	$(VENV)/bin/lookalike serve demo-index --port $(PORT)

test: setup
	$(PY) -m pytest -q --durations=10

bench: setup
	$(PY) benchmarks/bench_build.py

clean:
	rm -rf demo-index .pytest_cache
