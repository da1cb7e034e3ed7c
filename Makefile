# The README's two commands:  `make all` (set up + run every study) and `make test`.
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
CORES ?= 2

.PHONY: all test env report lint dvc-yaml clean-results

env:
	scripts/setup_env.sh $(VENV)

all: env
	snakemake all --cores $(CORES)

test: env
	pytest

report: env
	snakemake --report report.html

lint: env
	snakemake --lint
	python -m mechrepro.dvcgen --check

dvc-yaml: env
	python -m mechrepro.dvcgen

clean-results:
	rm -rf results figures/ioi_generalization figures/subspace_illusion figures/mcq_circuits logs .snakemake
