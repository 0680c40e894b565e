# Two commands do everything on a fresh machine:
#   make demo   - synthetic corpus -> shards -> pre-train tiny model -> linear probe table
#   make test   - the test suite (what CI runs)
# Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: demo test lint clean venv

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python -m matpac_fast.demo --out $(DEMO_DIR)

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# runs/ is not ours to delete: besides the demo's output it holds what the README's commands write there (training
# runs such as runs/as2m, days of GPU time; evaluations), which `make clean` used to delete with the rest.
clean:
	rm -rf $(VENV) build *.egg-info
	@if [ -e runs ]; then echo "kept runs/ (training runs, evaluations, the demo's $(DEMO_DIR)): delete what you no longer need yourself"; fi
