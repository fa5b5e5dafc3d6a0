# The README's commands. Each target sets itself up: it creates .venv when it
# is missing and (re)installs when pyproject.toml or the lock changed, so a
# fresh clone needs nothing but python3 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastppo-installed

# requirements.lock: the exact versions the suite last passed with (pip, torch and every dependency),
# applied as pip constraints, so a fresh clone installs what was tested and not whatever the registry
# serves that day; pyproject.toml keeps the ranges that work for library users. `make lock` refreshes it.
# torch 2.13.0 installs a CPU build from local disk here; triton 3.7.1 is the version that torch pins.
LOCK       := requirements.lock
TORCH_PIN  := torch==2.13.0
TRITON_PIN := triton==3.7.1

# TRL 1.12.0 (the last release with PPO, in trl.experimental.ppo) for bench/trainer.py's
# comparison, in its own venv: TRL and fastppo need not agree on transformers.
TRL_VENV  := .venv-trl
TRL_PIN   := trl==1.12.0
TRL_STAMP := $(TRL_VENV)/.trl-installed

.PHONY: demo test bench bench-trl-venv bench-grpo-venv gpu-check gpu-wheels install lock clean

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) -e ".[test,bench]"
	touch $(STAMP)

# `make lock`: the newest releases pyproject.toml admits (torch and triton pinned as above), installed in a
# scratch venv; the whole suite runs there, and only when it passes is requirements.lock rewritten from
# that venv. Review the diff of requirements.lock and commit it.
LOCK_VENV := .venv-lock

lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[test,bench]" $(TORCH_PIN) $(TRITON_PIN)
	TRITON_INTERPRET=1 $(LOCK_VENV)/bin/pytest -p no:cacheprovider
	{ echo "# The exact versions \`make test\` last passed with (pip constraints; \`make lock\` refreshes this file)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastppo demo $(ARGS)

# The whole suite on CPU: Triton kernels run under the interpreter.
test: $(STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/pytest $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/fastppo bench $(ARGS)

# $(call trl_venv,DIR,PIN): a venv in DIR holding PIN over this project's torch pin (the constraints file keeps
# pip from swapping torch for another, multi-GB CUDA build), stamped when done.
define trl_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	echo "$(TORCH_PIN)" > $(1)/constraints.txt
	$(1)/bin/python -m pip install -q $(TORCH_PIN)
	$(1)/bin/python -m pip install -q -c $(1)/constraints.txt $(2)
	touch $(1)/.trl-installed
endef

$(TRL_STAMP): Makefile
	$(call trl_venv,$(TRL_VENV),$(TRL_PIN))

bench-trl-venv: $(TRL_STAMP)

# The current TRL release (GRPOTrainer) for bench/grpo.py, in a venv of its own: TRL 1.12 above is the
# last release with PPO, and GRPO is compared against the release users install today.
GRPO_VENV  := .venv-trl-grpo
GRPO_PIN   := trl==1.16.0
GRPO_STAMP := $(GRPO_VENV)/.trl-installed

$(GRPO_STAMP): Makefile
	$(call trl_venv,$(GRPO_VENV),$(GRPO_PIN))

bench-grpo-venv: $(GRPO_STAMP)

# `make gpu-check`: every GPU path in <= 8 minutes (docs/gpu_check.md). Where python3 sees a CUDA device it
# runs with that python3 as it is: no venv, no install, no network (tools/gpu_check.py imports this
# checkout as fastppo and takes what the machine lacks from .wheels/). Elsewhere it runs in the venv, at
# tiny sizes under the Triton interpreter, with results in bench/results/cpu_check/.
gpu-check:
	@if $(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
		$(PYTHON) tools/gpu_check.py $(ARGS); \
	else \
		$(MAKE) --no-print-directory $(STAMP) && $(PY) tools/gpu_check.py $(ARGS); \
	fi

# The pure-Python packages a bare torch 2.11 / Python 3.12 GPU image lacks (it has torch, triton,
# transformers and their dependencies: numpy, pyyaml, packaging, tokenizers, safetensors, tqdm), downloaded
# here into .wheels/ to bring along. TensorBoard and pyarrow are optional: the check runs without them.
GPU_WHEELS := omegaconf pytest pytest-timeout pluggy iniconfig pygments

gpu-wheels:
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d .wheels $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(TRL_VENV) $(GRPO_VENV) $(LOCK_VENV) build *.egg-info .pytest_cache
