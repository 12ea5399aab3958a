# q2l developer commands. `make install` once, then everything runs inside .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CKPT ?=
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train eval test test-fast bench gpu-check lint format tensorboard clean clean-outputs

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make install needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY) ## create .venv with torch 2.14.1 / torchvision 0.29.1 and q2l (editable, dev and export tools, every logger)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev,export,mlflow,wandb]'
	@$(PY) -c "import torch, torchvision, q2l; print('q2l', q2l.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"

train: ## train the demo (embedded handwriting data, no download); ARGS="key=value ..." to override
	$(PY) train.py experiment=demo $(ARGS)

eval: ## evaluate a checkpoint: make eval CKPT=outputs/.../checkpoints/best.pt [ARGS=...]
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=path/to/best.pt [ARGS='dataset=... dataset.root=...']"; exit 2; }
	$(PY) eval.py ckpt=$(CKPT) $(ARGS)

# Two workers, one test file each at a time, in the order tests/conftest.py gives (heaviest file
# first; xdist would reorder them by test count); one thread per process, so the workers and the
# processes the CLI tests start share the cores instead of fighting over them. Bytecode caches are
# kept even where the environment sets PYTHONDONTWRITEBYTECODE: without them each worker rewrites
# every test module's asserts again (1.4-2.4 s a process) and each command the tests start compiles
# q2l again.
TEST_RUN := OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: ## run the whole test suite (CPU, a few minutes on 2 cores)
	$(TEST_RUN) $(ARGS)

test-fast: ## the suite without the tests marked slow (they train, start a command, or sweep every shipped config)
	$(TEST_RUN) -m "not slow" $(ARGS)

bench: ## benchmarks, see docs/performance.md; Q2L_OFFICIAL_CODE=<checkout> adds the official Q2L rows
	$(PY) -m benchmarks $(ARGS)

gpu-check: ## on a machine with a GPU: scripts/gpu_check.py (CUDA paths, throughput vs the official code)
	$(PY) scripts/gpu_check.py $(ARGS)

lint: ## ruff
	$(VENV)/bin/ruff check src tests benchmarks scripts train.py eval.py predict.py
	$(VENV)/bin/ruff format --check src tests benchmarks scripts train.py eval.py predict.py

format: ## ruff format + import sorting
	$(VENV)/bin/ruff check --fix --select I src tests benchmarks scripts train.py eval.py predict.py
	$(VENV)/bin/ruff format src tests benchmarks scripts train.py eval.py predict.py

tensorboard: ## TensorBoard over outputs/ (localhost only)
	$(VENV)/bin/tensorboard --logdir outputs --host 127.0.0.1

clean: ## remove caches and build leftovers (keeps outputs/ and data/)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

clean-outputs: ## delete every run directory under outputs/
	find outputs -mindepth 1 -not -name .gitkeep -delete
