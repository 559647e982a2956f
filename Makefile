# The README's two commands:  make demo  |  make test
# Each creates/refreshes the virtual environment first.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.pnoc-installed
CORES   ?= all
# pytest-xdist workers of `make test` (2: CI's cores; the SLURM tests share one, tests/conftest.py)
TEST_WORKERS ?= 2
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv demo test test-fast lint report clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[workflow,timm,test]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	snakemake --cores $(CORES) --rerun-incomplete
	snakemake --cores $(CORES) --report report.html
	@cat results/summary.md

test: venv
	pytest -q -n $(TEST_WORKERS) --dist loadgroup --timeout 1500 tests

test-fast: venv
	pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not slurm" tests

lint: venv
	snakemake --lint

report: venv
	snakemake --cores $(CORES) --report report.html

clean:
	rm -rf results report.html .snakemake
