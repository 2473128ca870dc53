# Two commands set everything up on a fresh machine:
#   make demo   — virtualenv + install (with TensorFlow for the worker) + `ckptd demo`
#   make test   — virtualenv + test extras + lint, types and the whole suite
#   make test-fast — under a minute: no TensorFlow (golden files instead), no slow tests
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-quick clean bytecode fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[tf-cpu,test]'
	$(MAKE) -s bytecode
	-git config core.hooksPath .githooks 2>/dev/null  # commit subjects ≤ 72 characters
	touch $(STAMP)

# What a wheel install does: with PYTHONDONTWRITEBYTECODE set, an editable checkout never gets
# .pyc files and every ckptd process compiles each module it imports (~80 ms a start).
bytecode: $(BIN)/python
	$(BIN)/python -m compileall -q ckptd

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ckptd demo

lint: $(STAMP)
	$(BIN)/ruff check ckptd migrations tests bench
	$(BIN)/ruff format --check ckptd migrations tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache  # the layers of DESIGN.md v2 (contracts in pyproject.toml)
	.ci/commit-subjects

# The suite in TEST_JOBS processes (pytest-xdist): most tests wait on daemons, trainers and
# servers, so three share two CPUs well. TEST_JOBS=0 runs it in this one process.
TEST_JOBS ?= 3
test: lint
	$(BIN)/python -m pytest -q -ra -n $(TEST_JOBS) $(PYTEST_ARGS)

# Also runs without TensorFlow installed: tests/golden holds files it wrote (regenerate.py).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not tf and not slow" $(PYTEST_ARGS)

# The parser fuzz tests with many more examples than the suite's time-boxed profile (no
# per-test timeout: a target runs for minutes; each example still has its deadline).
fuzz: $(STAMP)
	CKPTD_FUZZ=ckptd-fuzz-long CKPTD_FUZZ_EXAMPLES=3000 $(BIN)/python -m pytest -q --timeout=0 \
	  tests/test_fuzz.py tests/test_fuzz_config.py --hypothesis-show-statistics

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
