# Two entry points for a fresh machine: `make run` and `make test`.
# Both create .venv and install the pinned stack (constraints.txt) once; later calls reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/vgpa demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_raster.py
	$(PY) benchmarks/bench_score.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
