# Two entry points: `make demo` (main job) and `make test` (test suite). Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints-test.txt $(VENV)/.installed
	$(BIN)/pip install -q -c constraints-test.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/python -m speechseq.demo

# `make test` leaves out the tests marked slow (end-to-end runs of child processes, a minute or more each);
# `make test-slow` runs those, and CI (.ci/run) runs both
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n auto --maxprocesses=4 --durations=25 -m "not slow" tests

test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n auto --maxprocesses=4 --durations=10 -m slow tests

clean:
	rm -rf $(VENV) demo_out
