# memctl: `make demo` trains the demo recipe, `make test` runs the tests.
# Both install what they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch that installs in seconds; GPU users install their own torch first.
TORCH_SPEC ?= torch==2.13.0
DEMO_RECIPE ?= recipes/ham_min8.yaml
# `make sweep SWEEP=recipes/sweep_x.yaml EXECUTOR=slurm [SWEEP_ARGS="--partition gpu --time 120"]`
SWEEP ?= recipes/sweep_copy.yaml
EXECUTOR ?= local
SWEEP_ARGS ?=

.PHONY: install demo sweep test test-fast lint format docs clean

$(BIN)/memctl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,plot,tensorboard,docs,mlflow]"
	touch $(BIN)/memctl

install: $(BIN)/memctl

demo: install
	$(BIN)/memctl train $(DEMO_RECIPE) --name demo-$$(date +%Y%m%d-%H%M%S)

sweep: install
	$(BIN)/memctl sweep $(SWEEP) --executor $(EXECUTOR) $(SWEEP_ARGS)

# The SLURM tests need a local cluster (tests/slurm/slurm-local.sh, root, Debian packages):
# started here under CI or with SLURM_TESTS=1, otherwise those tests skip and say why.
SLURM_TESTS ?= $(CI)
# Seconds between SIGTERM and SIGKILL of a cancelled job on that cluster; exported so that
# the tests that call the start script see the same configuration.
export SLURM_LOCAL_KILLWAIT ?= 5

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@if [ "$(SLURM_TESTS)" = "true" ] || [ "$(SLURM_TESTS)" = "1" ]; then \
	  tests/slurm/slurm-local.sh start \
	    || echo "local SLURM did not start: the SLURM tests will skip"; fi
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The docs site (mkdocs-material) into site/; --strict: a broken link or reference fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache site
