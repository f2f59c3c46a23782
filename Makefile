PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser test lint typecheck demo bench clean

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

bench: $(STAMP)
	$(BIN)/python bench/core.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
