PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/dev.txt
# Refreshing the lock is done on purpose, with this pinned pip-tools (make lock).
PIP_TOOLS := pip-tools==7.7.0
COMPILE = --quiet --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links --strip-extras
EXTRAS := dev,redis,postgres,metrics,dashboard,bench,sqlalchemy,django,sentry,otel,celery,rq

# make test leaves out the extended tests (longer runs of what it covers already);
# make test-all runs every test.
PYTEST_ARGS ?= -m "not extended"

.PHONY: install browser test test-all lint typecheck docs demo bench chaos lock test-latest clean

# The development venv holds exactly the lock: every package pinned with its hash,
# nothing resolved at install time. The venv is made anew whenever the lock changes.
$(STAMP): $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/pip check
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
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	tests/lanes.sh $(BIN)/pytest $(PYTEST_ARGS)

test-all: $(STAMP) browser
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

demo: $(STAMP)
	$(BIN)/python -m examples.pipeline demo $(ARGS)

# Every benchmark, one after the other (about 25 minutes); JSON in bench/results/.
# The peers (RQ, Celery, APScheduler) come from the bench extra, which the lock holds.
bench: $(STAMP)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/coordinators.py
	$(BIN)/python bench/isolation.py
	$(BIN)/python bench/peers.py
	$(BIN)/python bench/fencing.py
	$(BIN)/python bench/scale.py

# The full fault matrix (a few minutes per coordinator); results in tests/chaos/results/.
# The wall-clock fault needs libfaketime: installed here when missing, as root only.
chaos: $(STAMP)
	@command -v faketime >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime; } \
	  >/tmp/ostinato-apt.log 2>&1; } \
	  || echo "make: *** libfaketime is missing: the clock_jump fault will be skipped"
	$(BIN)/python -m tests.chaos.run --coordinator all $(CHAOS_ARGS)

# Refresh the lock to the newest releases that pyproject.toml allows. Run it on purpose,
# then make test, and commit requirements/ with what had to change. `make lock UPGRADE=`
# adds what pyproject.toml newly asks for and keeps every other pin as it is.
UPGRADE ?= --upgrade
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --disable-pip-version-check $(PIP_TOOLS)
	.venv-lock/bin/pip-compile $(COMPILE) $(UPGRADE) --extra $(EXTRAS) -o requirements/dev.txt pyproject.toml
	.venv-lock/bin/pip-compile $(COMPILE) $(UPGRADE) -o requirements/runtime.txt pyproject.toml
	rm -rf .venv-lock

# The suite against the newest releases, in a venv of its own: how an upgrade is tried
# before make lock takes it. Not part of make test, and never touches .venv.
test-latest: browser
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	.venv-latest/bin/pip install --quiet --disable-pip-version-check --upgrade -e '.[$(EXTRAS)]'
	.venv-latest/bin/ruff check src tests bench examples
	.venv-latest/bin/mypy
	.venv-latest/bin/mkdocs build --strict --quiet --site-dir .venv-latest/site
	.venv-latest/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-latest .venv-lock site .pytest_cache .mypy_cache .ruff_cache
