# The two commands: `make repro` runs the whole pipeline, `make test` runs the tests.
# Each creates .venv and installs the pinned stack first when it is missing or stale.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Stage commands in dvc.yaml say `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install browser repro test test-fast benchmarks clean-venv

install: $(STAMP)

$(STAMP): requirements.txt requirements-embedded.txt constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-embedded.txt
	@touch $@

# Headless Chromium and its driver (Debian packages) for the labelling tool's browser tests.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
	  echo "chromium/chromedriver missing: the labelling tool's browser tests will be skipped"

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP) browser
	$(BIN)/python -m pytest

test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)
