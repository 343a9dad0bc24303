# The two Quickstart commands. Each sets up .venv first (see scripts/setup.sh for TORCH_SPEC and EXTRAS).
#   make train [ARGS="recipe key=value ..."]   trains the default recipe (or ARGS) and evaluates it
#   make test                                  runs ruff and the test suite, one worker per CPU core
#                                              (PYTEST_WORKERS=N to choose, 0 for one process)
#   make docs                                  builds the API reference into site/ (strict: warnings fail)
#   make gpu-check                             the contracts and benchmarks on CUDA (scripts/gpu_check.sh)
.PHONY: setup train test lint docs gpu-check

setup:
	@bash scripts/setup.sh

train: setup
	.venv/bin/polyattn train $(ARGS)

lint: setup
	.venv/bin/ruff check src tests examples

docs: setup
	PYTHONPATH=src .venv/bin/mkdocs build --strict --quiet

PYTEST_WORKERS ?= auto

test: lint
	@# the torchrun tests run after the rest, in one process (tests/test_distributed.py says why); exit status 5
	@# is "no test selected", which a PYTEST_ARGS naming tests of only one kind gives one of the passes
	.venv/bin/python -m pytest -n $(PYTEST_WORKERS) -m "not torchrun" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	.venv/bin/python -m pytest -p no:xdist -m torchrun $(PYTEST_ARGS) || [ $$? -eq 5 ]

gpu-check: setup
	bash scripts/gpu_check.sh
