# `make demo` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.berth-installed

.PHONY: demo test test-all test-slow lint format clean

# torch goes first and pinned: an unpinned torch pulled in by a dependency would fetch GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/berth demo

test: $(STAMP) lint
	$(PY) -m pytest -m "not slow and not gpu"

test-all: $(STAMP) lint
	$(PY) -m pytest

# The tests marked slow (minutes each: the rest of the engine matrix, the quick demo, fault injection); CI runs
# them after `make test`.
test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not gpu"

# mypy checks the package as it installs: a tree of links puts the stage folders under berth/ (package-dir).
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/berth
	for f in berth/*; do ln -s $(CURDIR)/$$f $(TYPECHECK)/berth/; done
	for d in tokenizer pretrain finetune configs; do ln -s $(CURDIR)/$$d $(TYPECHECK)/berth/$$d; done
	cd $(TYPECHECK) && MYPYPATH=. $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p berth

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs build .pytest_cache .ruff_cache .mypy_cache
