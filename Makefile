# The README's two commands:  `make all` (set up + run every study) and `make test`.
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
CORES ?= 2

.PHONY: all test test-fast test-robustness env report lint dvc-yaml readme-results clean-results

env:
	scripts/setup_env.sh $(VENV)

all: env
	snakemake all --cores $(CORES)

# The test suite (unit, smoke pipeline, workflow, default model): about 22 minutes on 2 cores.
test: env
	pytest -m "not robustness"

# Unit tests only (tiny random models, no Snakemake run): run after every change.
test-fast: env
	pytest -m "not slow and not integration and not workflow and not robustness"

# Determinism and crash recovery: a serial smoke run, SIGKILLed at three points and completed, equals
# the --cores 2 run byte for byte (about 15 minutes: both runs). CI runs it after `make test`.
test-robustness: env
	pytest -m robustness

report: env
	snakemake --report report.html

# Static checks (CI runs them before the tests): Snakemake's linter, the rules' formatting, ruff,
# dvc.yaml against the Snakemake DAG, and the README's claims tables against reference/published.yaml.
lint: env
	snakemake --lint
	snakefmt --check Snakefile workflow/rules
	ruff check .
	python -m mechrepro.workflow.dvcgen --check
	python -m mechrepro.workflow.report --check

# The README's claims tables, from results/replication.md of a default run (RUN: its directory).
RUN ?= .
readme-results: env
	python -m mechrepro.workflow.report $(RUN)

dvc-yaml: env
	python -m mechrepro.workflow.dvcgen

clean-results:  # every study's results, figures (figures/<study>/) and logs
	rm -rf results logs .snakemake
	find figures -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
