# Quick start: `make run` (web UI / example generation) and `make test`.
# Both create .venv and install the project on first use, and re-install when pyproject.toml or
# constraints.txt change. constraints.txt pins the torch build that lies on this machine's disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loraloom-installed
EXTRAS ?= ui,eval,dev

.PHONY: run test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $(STAMP)

# The web UI on http://127.0.0.1:7860 with the toy world (the tiny random model until assets/toyworld is there).
# Extra flags: make run UI_ARGS="--port 7861 --auth me:secret"
run: $(STAMP)
	$(VENV)/bin/loraloom ui $(UI_ARGS)

# tools/ensure_chromium.sh installs Debian's chromium for the browser test when it is missing (never fails);
# ruff checks the code with the rules in pyproject.toml before the suite runs.
test: $(STAMP)
	@sh tools/ensure_chromium.sh
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
