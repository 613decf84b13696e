# `make run`: set up .venv and generate with the default model. `make test`: set up, then pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France?

.PHONY: run test setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/edgelm generate --model default --chat --prompt "$(PROMPT)" --max-tokens 64

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
