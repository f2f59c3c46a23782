PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser test lint typecheck demo bench chaos clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,redis,postgres,metrics,dashboard]'
	touch $(STAMP)

install: $(STAMP)

# The dashboard tests drive Debian's chromium (never a downloaded browser). Installed
# only where missing and only as root; elsewhere those tests skip with one loud line.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing chromium for the dashboard tests"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver; } >/tmp/ostinato-apt.log 2>&1 \
	      || echo "make: *** could not install chromium, see /tmp/ostinato-apt.log"; \
	  else \
	    echo "make: *** chromium is missing and this is not root: the browser tests will be skipped"; \
	  fi; \
	fi

test: $(STAMP) browser
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python examples/demo.py

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[bench,dev,redis,postgres,metrics,dashboard]'
	touch $(BENCH_STAMP)

# Every benchmark, one after the other (about 13 minutes); JSON in bench/results/.
# The peers (RQ, Celery, APScheduler) come from the bench extra, installed here.
bench: $(BENCH_STAMP)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/coordinators.py
	$(BIN)/python bench/isolation.py
	$(BIN)/python bench/peers.py

# The full fault matrix (a few minutes per coordinator); results in tests/chaos/results/.
# The wall-clock fault needs libfaketime: installed here when missing, as root only.
chaos: $(STAMP)
	@command -v faketime >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime; } \
	  >/tmp/ostinato-apt.log 2>&1; } \
	  || echo "make: *** libfaketime is missing: the clock_jump fault will be skipped"
	$(BIN)/python -m tests.chaos.run --coordinator all $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
