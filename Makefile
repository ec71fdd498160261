# The two set-up commands of the README: `make quickstart` (main job) and `make test`.
PYTHON ?= python3.12
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

TORCH_PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv quickstart bias test test-all bench bench-full bench-gpu torch-venv clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# Main job on its default configuration (fedhl-train is the console script of fedhl_jax.cli).
quickstart: venv
	$(BIN)/fedhl-train --config configs/quickstart.yaml --out runs/quickstart-$$(date +%Y%m%d-%H%M%S)

# The bias-elimination experiment: docs/bias_experiment.md and docs/figures/bias_experiment.png.
bias: venv
	$(BIN)/fedhl-bias

# Unit and integration suite (slow experiments excluded).
test: venv
	$(PY) -m pytest -m "not slow" -q --durations=15

# Everything, slow experiments included.
test-all: venv
	$(PY) -m pytest -q

# Benchmarks (docs/performance.md). The PyTorch/PEFT baseline runs in its own venv (`make torch-venv`).
bench: venv
	$(PY) benchmarks/run.py --quick

bench-full: venv
	$(PY) benchmarks/run.py --full --markdown docs/performance.md --out docs/results/performance.json

# Accelerator round (SmolLM2-shaped x 100 clients, Llama-2-7B-shaped bf16); needs jax[cuda12] on a GPU.
bench-gpu: venv
	XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 $(PY) benchmarks/run.py --gpu --out docs/results/performance_gpu.json --markdown docs/performance_gpu.md

torch-venv:
	$(TORCH_PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install --quiet "$(TORCH_SPEC)" peft transformers safetensors numpy gguf

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
