# Fresh-machine entry points. `make test` and `make demo` create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch/torchvision are pinned here (not in pyproject) so a plain `pip install .` elsewhere may pick the
# build matching its own CUDA; these two releases install from the local wheel cache on our machines.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-all demo demo-pretrain bench gpu-check lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# The end-to-end demo: demo backbone -> stage 1 (pipeline/pretrain.py) -> stage 2, 5 methods x 3 seeds -> table.
demo: $(STAMP)
	$(PY) -m pipeline.digits_demo

# Stage 1 of the demo alone, through accelerate.
demo-pretrain: $(STAMP)
	$(VENV)/bin/accelerate launch --config_file launch/accelerate/cpu_1proc.yaml pipeline/pretrain.py

# Every benchmark; writes its figures into docs/BENCHMARKS.md (~25 min on 2 cores; BENCH_ARGS=--quick).
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)

# On a machine with one CUDA GPU: gpu tests, ViT-B/16 bf16 meta benchmark, short stage 1 (plain and through
# the DeepSpeed launcher config) and stage 2 from its artifact, < 8 min; summary in runs/gpu_check/ and the
# gpu-check block of docs/BENCHMARKS.md. `$(PY) bench/gpu_check.py --dry-run` runs the same steps on the CPU.
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --doc docs/BENCHMARKS.md

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
