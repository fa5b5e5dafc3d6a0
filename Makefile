# The README's commands. Each target sets itself up: it creates .venv when it
# is missing and (re)installs when pyproject.toml changed, so a fresh clone
# needs nothing but python3 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastppo-installed

# torch 2.13.0 installs a CPU build from local disk here; triton 3.7.1 is the
# version that torch pins. pyproject.toml keeps loose ranges for users.
TORCH_PIN  := torch==2.13.0
TRITON_PIN := triton==3.7.1

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) $(TRITON_PIN)
	$(PY) -m pip install -q -e ".[test,bench]" $(TORCH_PIN) $(TRITON_PIN)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastppo demo $(ARGS)

# The whole suite on CPU: Triton kernels run under the interpreter. The venv's
# scripts are called directly: `python -m` would put the repo root on sys.path,
# where kernels/ would be importable as a top-level `kernels` package.
test: $(STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/pytest $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/fastppo bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
