# Two entry points for a fresh machine: `make run` and `make test`.
# Both create .venv and install the pinned stack (constraints.txt) once; later calls reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,dev,da3]'
	# Depth Anything 3 declares requirements that would downgrade numpy; what it needs at run time
	# is the da3 extra above, so the package itself goes in without its declared dependencies.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt depth-anything-3==0.1.1
	touch $(STAMP)

# The service on an embedded local Ray: prints its URL, scores the demo video once, serves until Ctrl-C.
run: $(STAMP)
	$(VENV)/bin/vgpa serve --self-check

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_raster.py
	$(PY) benchmarks/bench_score.py
	$(PY) benchmarks/bench_service.py
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_hostile.py

# One prepared GPU check (benchmarks/README.md): figures beside their targets, JSON to $(OUT) or ".".
# Full size needs CUDA and well under 8 minutes; GPU_CHECK_ARGS=--tiny runs the CPU form.
gpu-check: $(STAMP)
	timeout 540 $(PY) benchmarks/gpu_check.py --budget-s 420 $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
