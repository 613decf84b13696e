# `make run`: set up .venv and generate with the default model. `make test`: set up, then pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France?
# llama.cpp (the speed peer) built for any x86-64 with AVX2; AMX off: its AMX path crashes on
# quantized models (../shared/docs/PEERS.md), and AVX-512 off so one build runs on AMD and Intel.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: run test setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,data]'
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q 'llama-cpp-python==0.3.36' \
		|| echo "WARNING: llama-cpp-python did not build; the llama.cpp back-end is unavailable"
	touch $(STAMP)

run: setup
	$(VENV)/bin/edgelm generate --model default --chat --prompt "$(PROMPT)" --max-tokens 64

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
