# Every target sets itself up on a fresh machine: it creates .venv and installs the package
# with its EXTRAS when they are missing (or pyproject.toml changed). The default includes the
# trl extra (trl, transformers and their data libraries, ~40 s on top of torch), so that the
# TRL and Hugging Face tests run rather than skip: `make test EXTRAS=test,bench` leaves it out.
PYTHON ?= python3
EXTRAS ?= test,bench,trl
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdkernels-installed

.PHONY: install test bench lint aot clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# The test suite (CPU: Triton kernels under TRITON_INTERPRET=1, the extension's CPU kernel).
test: $(STAMP)
	$(PY) -m pytest -q

# The main job: benchmark against PyTorch on whatever device is present.
bench: $(STAMP)
	$(PY) -m bench $(ARGS)

# Compile every Triton kernel config for sm_80 / sm_90 (no GPU needed); fail on any spill.
aot: $(STAMP)
	$(PY) -m kdkernels.triton.aot --fail-on-spill $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
