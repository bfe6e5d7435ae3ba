# make quickstart: create .venv, install amp-deploy, run the quickstart build.
# make test:       create .venv, install amp-deploy with its test extras, run the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: quickstart test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

quickstart: $(VENV)/.installed
	$(BIN)/amp-deploy build recipes/quickstart.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf out .pytest_cache
