# detr_cuda: set-up, tests, benchmarks. `make help` lists the targets.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# The CPU machines install this local build; a newer or unpinned torch would
# pull gigabytes of CUDA packages. A machine that already has torch (a GPU
# machine with its own CUDA build) keeps it.
TORCH_VERSION ?= 2.13.0
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90
PYTEST_ARGS ?=
# The flags torch.utils.cpp_extension adds to every nvcc call.
TORCH_NVCC_FLAGS = -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
	-D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr

# `make demo` first runs this target; DEMO_SETUP=build builds in place instead of installing.
DEMO_SETUP ?= install
DEMO_OUT ?= outputs/demo

.PHONY: help install install-extras installed build test test-cuda-compile bench lint demo clean

help:
	@echo "make install            install dependencies (pinned torch) and build the extension"
	@echo "make install-extras     optional matplotlib (eval plots), onnx + onnxruntime (export check)"
	@echo "make test               run the test suite (CUDA tests skip without a GPU)"
	@echo "make test-cuda-compile  compile every csrc/cuda/*.cu with nvcc for sm_$(firstword $(CUDA_ARCHS))..sm_$(lastword $(CUDA_ARCHS))"
	@echo "make demo               generate the built-in dataset, train the small config, evaluate"
	@echo "make bench              operator and model benchmarks (tables of ratios)"
	@echo "make lint               static checks"

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -r requirements.txt
	$(PIP) install -e . --no-build-isolation

# Optional: plots after evaluation (matplotlib) and the ONNX export check (onnx, onnxruntime).
# None of them depends on torch. CI installs them so their tests run there.
install-extras:
	$(PIP) install -r requirements-extras.txt

# `make test` on a fresh checkout installs first; after `make install` it goes straight to pytest.
installed:
	@$(PYTHON) -c "import torch, detr_cuda._C, scipy, pycocotools, yaml, tensorboard" 2>/dev/null || $(MAKE) install

build:
	$(PYTHON) setup.py build_ext --inplace

test: installed
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

# The .cu files include no torch headers, so they compile with nvcc alone even
# where torch is a CPU build: a CUDA typo fails here, not in a user's build.
# ptxas warns about any kernel variant that spills registers (none does; the
# register table is in benchmarks/RESULTS.md).
# The torch glue (WITH_CUDA) is then syntax-checked against torch's headers;
# a CPU build of torch lacks c10's generated cuda_cmake_macros.h, which a
# throw-away shim (used only if the real one is missing) stands in for.
test-cuda-compile:
	@command -v $(NVCC) >/dev/null || { echo "nvcc not found: skipping CUDA compile check"; exit 0; }; \
	set -e; tmp=$$(mktemp -d); \
	for src in csrc/cuda/*.cu; do \
	  for arch in $(CUDA_ARCHS); do \
	    echo "nvcc sm_$$arch $$src"; \
	    $(NVCC) -std=c++17 -O3 -Icsrc $(TORCH_NVCC_FLAGS) -Xptxas -warn-spills -gencode arch=compute_$$arch,code=sm_$$arch -c $$src -o $$tmp/$$(basename $$src).$$arch.o; \
	  done; \
	done; \
	torch_includes=$$($(PYTHON) -c "from torch.utils.cpp_extension import include_paths; import sysconfig; print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))" 2>/dev/null) || { echo "torch not importable: skipping the glue check"; rm -rf $$tmp; exit 0; }; \
	cuda_include=$$($(PYTHON) -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '/usr/local/cuda')")/include; \
	mkdir -p $$tmp/shim/c10/cuda/impl; \
	printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > $$tmp/shim/c10/cuda/impl/cuda_cmake_macros.h; \
	for src in csrc/cuda/*.cpp csrc/ms_deform_attn_op.cpp; do \
	  echo "c++ -fsyntax-only -DWITH_CUDA $$src"; \
	  $(CXX) -fsyntax-only -std=c++17 -DWITH_CUDA -DTORCH_EXTENSION_NAME=_C -Wno-c++20-extensions -Icsrc $$torch_includes -I$$cuda_include -idirafter $$tmp/shim $$src; \
	done; rm -rf $$tmp

# Generates the built-in dataset (data_generated/synthetic), trains configs/demo.yaml from
# scratch on whatever device is there, then evaluates the final weights on the held-out
# generated images and prints the COCO table. A fresh output folder every time.
# The generated dataset is written on first use (data.synthetic_* fields of the config).
demo: $(DEMO_SETUP)
	rm -rf $(DEMO_OUT)
	$(PYTHON) tools/train.py --config configs/demo.yaml train.output_dir=$(DEMO_OUT) train.eval_every=-1
	$(PYTHON) tools/eval.py --config configs/demo.yaml --weights $(DEMO_OUT)/checkpoint_last.pth --output-dir $(DEMO_OUT)/eval

bench:
	$(PYTHON) benchmarks/bench_msda.py
	$(PYTHON) benchmarks/bench_model.py

lint:
	$(PYTHON) -m compileall -q detr_cuda tools tests benchmarks

clean:
	rm -rf build detr_cuda/*.so *.egg-info
