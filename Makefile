# Quick start: `make run` then `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ART    := artifacts/gemma3-270m
# the artifact that suits this machine: onnx on a CPU, xla on a TPU or GPU (or TARGET=tflite, ...)
TARGET ?= auto
PROMPT ?= The capital of France is

.PHONY: venv tools export run test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[export,xla,tflite,onnx,tpu,test]"
	$(PY) -m pip install -q --no-deps litert-converter==0.5.0   # see pyproject.toml's export extra
	# a local wheelhouse for tests/test_thin_install.py (a fresh venv with only the onnx extra),
	# so that `make test` itself needs no package index
	$(PY) -m pip download -q -d $(VENV)/wheels ".[onnx]" "setuptools>=77"
	touch $@

# one stamp per target asked for: `make run TARGET=xla` adds xla to the same directory
artifacts/.made-gemma3-270m-$(TARGET): $(VENV)/.installed
	$(PY) -m compile.export --target $(TARGET) --out $(ART)
	touch $@

export: artifacts/.made-gemma3-270m-$(TARGET)

run: export
	$(PY) -m runtime.generate --artifacts $(ART) --target $(if $(filter all,$(TARGET)),auto,$(TARGET)) \
		--prompt "$(PROMPT)" --max-new-tokens 48

# the Kotlin compiler (npm) and JUnit (Debian) for the Android core's unit tests
tools:
	bash android_demo/core/tools.sh >/dev/null

test: venv tools
	$(PY) -m pytest tests -q -n 2 --dist loadfile --durations=15   # docs/testing.md

clean:
	rm -rf artifacts .pytest_cache .test-artifacts
