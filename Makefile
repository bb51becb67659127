# Hansa — the two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SRC    := hansa protocol crypto federation node

.PHONY: test lint typecheck typecheck-tree pytest demo vectors bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# mypy cannot follow setuptools' package-dir mapping through an editable
# install, so it checks a link tree that mirrors the installed layout.
typecheck-tree:
	rm -rf .typecheck && mkdir -p .typecheck/hansa
	for f in hansa/*; do ln -s ../../$$f .typecheck/$$f; done
	for p in protocol crypto federation node; do ln -s ../../$$p .typecheck/hansa/$$p; done

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP) typecheck-tree
	$(BIN)/mypy -p hansa
	$(BIN)/mypy bench tests spec/generate_vectors.py

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

vectors: $(STAMP)
	$(BIN)/python spec/generate_vectors.py

bench: $(STAMP)
	$(BIN)/python bench/crypto.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/node.py
	$(BIN)/python bench/fanout.py

demo: $(STAMP)
	$(BIN)/python -m hansa.node.demo

clean:
	rm -rf $(VENV) .typecheck build *.egg-info .mypy_cache .pytest_cache .ruff_cache .hypothesis
