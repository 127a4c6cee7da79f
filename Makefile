# Fresh-machine entry points. `make test` and `make demo` create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch/torchvision are pinned here (not in pyproject) so a plain `pip install .` elsewhere may pick the
# build matching its own CUDA; these two releases install from the local wheel cache on our machines.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-all demo science suite-data digits-demo demo-pretrain bench gpu-check lint clean

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

# The demo: a reduced run of the suite (style-shifted glyphs, digits, clothing; backbone trained here by
# open_clip_train, stage 1 matched and clean-only, stage 2 six rows x 3 datasets x 2 seeds, table with CIs).
demo: $(STAMP)
	$(PY) -m pipeline.suite --preset demo

# The full suite grid (11 rows x 5 datasets x 2 shot counts x 5 seeds; ~45 min on 2 cores with data cached),
# written into docs/RESULTS.md; resumable (finished runs are skipped).
science: $(STAMP)
	$(PY) -m pipeline.suite --preset full --doc docs/RESULTS.md

# The suite's data alone: glyphs, digits, Fashion-MNIST (if installed), corpora, backbone (cached in cache/suite).
suite-data: $(STAMP)
	$(PY) -m pipeline.suite.data

# The small digits demo: digits backbone -> stage 1 (pipeline/pretrain.py) -> stage 2, 5 methods x 3 seeds.
digits-demo: $(STAMP)
	$(PY) -m pipeline.digits_demo

# Stage 1 of the digits demo alone, through accelerate.
demo-pretrain: $(STAMP)
	$(VENV)/bin/accelerate launch --config_file launch/accelerate/cpu_1proc.yaml pipeline/pretrain.py

# Every benchmark; writes its figures into docs/BENCHMARKS.md (~45 min on 2 cores, 19 of them the label-space scaling; BENCH_ARGS=--quick).
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
