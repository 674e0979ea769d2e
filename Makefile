# Everything runs inside .venv, created on first use. Override VENV / PYTHON / TORCH_VERSION if needed.
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The kernel built by `make kernels` under its Hub repo id (a `kernels` feature): tests, the demo and the benchmarks
# use it without the Hub; without a build, the models fall back to the PyTorch path.
export LOCAL_KERNELS ?= rwkv-clip-hf/bi-wkv=$(CURDIR)/cuda

.PHONY: install lint kernels kernels-check kernels-cuda kernels-cuda-check gpu-check test test-all test-export demo default-model bench bench-bi-wkv bench-train clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The Bi-WKV kernel (cuda/): the CPU variant into cuda/build/<variant>/ (about a minute on 2 cores; a no-op
# when up to date) and the Triton variants (Python, the package's Triton Bi-WKV) into cuda/build/torch-{cuda,rocm,xpu}/. kernels-cuda needs a CUDA build of torch; kernels-cuda-check only compiles the CUDA sources
# with nvcc (no CUDA torch needed). CI builds and tests the CPU variant only.
MAX_JOBS ?= 2
kernels: $(STAMP)
	MAX_JOBS=$(MAX_JOBS) $(PY) cuda/build.py --backend cpu triton

kernels-cuda: $(STAMP)
	MAX_JOBS=$(MAX_JOBS) $(PY) cuda/build.py --backend cuda

kernels-cuda-check: $(STAMP)
	$(PY) cuda/build.py --cuda-compile-only

# The kernel hub's rules on the built variants (cuda/check_hub_rules.py): the flattened layout with its
# compatibility package, metadata.json with the files' digest, no OpenMP runtime linked, no glibc symbol newer
# than 2.28 (readelf). Part of `make test` (also as tests/ops/test_kernel_build.py).
kernels-check: kernels
	$(PY) cuda/check_hub_rules.py

# ruff (configured in pyproject.toml): lint and formatting; the first step of `make test`.
lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# The test command of README.md and CI: offline, CPU only, lint-clean, with the CPU kernel built and required.
# The tests find the build through LOCAL_KERNELS (above; tests/conftest.py sets the same default).
test: $(STAMP) lint kernels kernels-check
	RWKV_CLIP_REQUIRE_KERNEL=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# Also the tests marked slow.
test-all: $(STAMP) kernels
	RWKV_CLIP_REQUIRE_KERNEL=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# torch.export, torch.compile(fullgraph=True) and ONNX export of the towers and the model (slow: a few minutes).
test-export: $(STAMP) kernels
	RWKV_CLIP_REQUIRE_KERNEL=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_export.py

# README's main job: zero-shot classification of examples/images with the bundled default model.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

# Regenerate the bundled default model (src/rwkv_clip_hf/default_model/): data, training, evaluation, model
# card; about 50 minutes on 2 CPU cores (image tower on colour x shape labels, 28,000 images x 7 epochs; then the
# text tower contrastively against the locked image tower, 32,000 images in random colours, in scenes of 3 x 14
# epochs; then 2,000 new test images per evaluation row).
default-model: $(STAMP) kernels
	HF_HUB_OFFLINE=1 $(PY) examples/build_default_model.py

bench: $(STAMP) kernels
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_towers.py

bench-bi-wkv: $(STAMP) kernels
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_bi_wkv.py --quick

# One command for a machine with a GPU (a CUDA build of torch, triton, nvcc): builds the CUDA and Triton variants,
# runs the CUDA and Triton tests natively (no interpreter), checks every Bi-WKV path against float64 and times it
# (CUDA kernel, Triton, chunked PyTorch, the original design), then RWKV-CLIP's vision tower with each path against
# transformers' CLIP at 224/448/896/1792 px; prints one table. Stops itself within 8 minutes.
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 timeout 470 $(PY) benchmarks/bench_bi_wkv.py --gpu-check

bench-train: $(STAMP) kernels
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) build cuda/build src/*.egg-info .pytest_cache
