# tpcli: `make install demo` sets up and runs the whole job on a tiny model built locally; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= .cache/demo
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-quick lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0    # the CPU build; a bare `torch` would pull CUDA wheels
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	@test -f $(DEMO)/model/config.json || $(BIN)/python -m tpcli.tiny qwen3 $(DEMO)/model --tokenizer
	$(BIN)/tpcli inspect $(DEMO)/model --tp 2
	$(BIN)/tpcli verify $(DEMO)/model --tp 2 --numerics
	$(BIN)/tpcli shard $(DEMO)/model --tp 2 --out $(DEMO)/tp2 --force
	$(BIN)/tpcli verify $(DEMO)/tp2
	$(BIN)/tpcli run --cpu 2 --model $(DEMO)/tp2 -m tpcli.examples.generate --prompt "Tensor parallel" --max-new-tokens 12
	$(BIN)/tpcli gather $(DEMO)/tp2 --out $(DEMO)/merged --force
	$(BIN)/python -m tpcli.examples.compare_logits $(DEMO)/model $(DEMO)/merged
	@echo "demo OK: inspect -> verify -> shard -> run -> gather"

test: install
	$(BIN)/python -m pytest -q

test-quick: install
	$(BIN)/python -m pytest -q -m "not dist"

lint: install
	$(BIN)/ruff check tpcli tests

bench: install
	$(BIN)/python -m tpcli.bench

clean:
	rm -rf $(DEMO) .pytest_cache
