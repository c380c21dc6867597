# The two commands: `make repro` runs the whole pipeline, `make test` runs the tests.
# Each creates .venv and installs the pinned stack first when it is missing or stale.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

# Stage commands in dvc.yaml say `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install browser repro tryout test test-fast benchmarks push pull clean-venv

install: $(STAMP)

$(STAMP): requirements.txt requirements-embedded.txt constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-embedded.txt
	@touch $@

# Test-only extras (the S3 remote plugin, a local S3 server); `make repro` does not need them.
$(TEST_STAMP): $(STAMP) requirements-test.txt constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt -c constraints.txt
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

# Try the models `make repro` built in the browser (tools/tryout.py): chat, blind comparisons whose votes go to
# data/raw/labels/tryout.jsonl, a leaderboard. PORT=n picks another port than 7860; Ctrl-C stops it.
tryout: $(STAMP)
	$(BIN)/python -m tools.tryout $(if $(PORT),--port $(PORT))

# Share results: check that the remote answers (one line naming it and what to check), then move the data.
# REMOTE=name picks a remote other than the default.
push: $(STAMP)
	$(BIN)/python -m tools.remote check --for push $(if $(REMOTE),-r $(REMOTE))
	$(BIN)/dvc push $(if $(REMOTE),-r $(REMOTE))

pull: $(STAMP)
	$(BIN)/python -m tools.remote check $(if $(REMOTE),-r $(REMOTE))
	$(BIN)/dvc pull $(if $(REMOTE),-r $(REMOTE))

# One pytest worker per core (at most 4), each test file on one worker: the pipeline tests spend most of their
# time in one-core Python (dvc, stage start-up), so two cores run the suite in about half the time.
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := $(BIN)/python -m pytest $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: $(TEST_STAMP) browser
	$(PYTEST)

test-fast: $(TEST_STAMP) browser
	$(PYTEST) -m "not slow"

clean-venv:
	rm -rf $(VENV)
