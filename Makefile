# make quickstart: create .venv, install amp-deploy, run the quickstart build.
# make test:       create .venv, install amp-deploy with its test extras, run the test suite.
# make gpu-check:  on a GPU machine, the GPU check (benchmarks/gpu_check.py); see benchmarks/RESULTS.md.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Outside references for the TensorRT code's static checks (tests/test_tensorrt_static.py), kept out
# of the venv: the stubs' `tensorrt/` folder would otherwise import as an empty namespace package.
TRT_STUBS    := tensorrt-stubs==10.13.0.35.1
TRT_BINDINGS := tensorrt-cu13-bindings==11.4.0.106
# Wheels the GPU machine lacks (it has torch, timm, onnx, onnxruntime, typer, rich, safetensors, ...).
GPU_WHEELS   := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5

.PHONY: quickstart test gpu-check gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	rm -rf .trt-ref
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target .trt-ref/stubs "$(TRT_STUBS)"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target .trt-ref/bindings "$(TRT_BINDINGS)"
	touch $@

quickstart: $(VENV)/.installed
	$(BIN)/amp-deploy build recipes/quickstart.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# Run where python3 has torch with CUDA; the project runs from this tree, carried wheels from .whl/.
gpu-check:
	if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile \
	  --target /tmp/site .whl/*.whl; fi
	PYTHONPATH=$(CURDIR):/tmp/site python3 benchmarks/gpu_check.py --out out/gpu_check

# Here (with network): the wheels `gpu-check` needs on the GPU machine, into .whl/ (git-ignored).
gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf out .pytest_cache
