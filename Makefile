# Set-up and the two commands of the README.  Everything installs into .venv (python3 -m venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast bench eval clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# triton for the GPU kernels' tests (under the interpreter on CPUs); kept out of `make demo` (~1 GB)
$(VENV)/.gpu: $(VENV)/.installed requirements-gpu.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-gpu.txt
	touch $@

$(VENV)/.bench: $(VENV)/.installed requirements-bench.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

data/shakespeare/ATTRIBUTION: $(VENV)/.installed
	$(PY) -m sparse_ssm.data.corpus data/shakespeare

## the main job on the small embedded default (CPU, minutes): train config/demo.yaml on the embedded corpus,
## then sample from the best checkpoint; run again, it continues the run in outputs/demo (after Ctrl-C) or
## reports the finished one (delete it to start afresh)
DEMO_DIR := outputs/demo
demo: $(VENV)/.installed data/shakespeare/ATTRIBUTION
	$(PY) main.py train --config config/demo.yaml --output-dir $(DEMO_DIR) --use-best-model \
		$$(test -e $(DEMO_DIR)/latest && echo --resume)
	@echo "--- a sample from the best checkpoint (temperature 0.8, top-k 50):"
	$(PY) main.py generate --model-dir $(DEMO_DIR) --checkpoint best --prompt "ROMEO." --max-length 120 \
		--temperature 0.8 --top-k 50 --seed 1
	@echo "--- serve it over the Ollama and OpenAI APIs: $(PY) main.py serve --model-dir $(DEMO_DIR)"

## the test suite (what CI runs; the Triton kernels under Triton's interpreter), then the numerics once more
## on the pure-PyTorch paths (no native kernel)
test: $(VENV)/.installed $(VENV)/.gpu
	$(PY) -m pytest -q
	SPARSE_SSM_NATIVE=0 $(PY) -m pytest -q -m "not slow" tests/ssm tests/model

## the suite without the tests marked slow (a minute or so, for development)
test-fast: $(VENV)/.installed $(VENV)/.gpu
	$(PY) -m pytest -q -m "not slow"

## benchmarks against peers (writes bench/results/)
bench: $(VENV)/.bench data/shakespeare/ATTRIBUTION
	$(PY) bench/train_step.py --compile
	$(PY) bench/structures.py
	$(PY) bench/generation.py
	$(PY) bench/length_scaling.py
	$(PY) bench/scan_roofline.py
	$(PY) bench/wallclock_lm.py
	$(PY) bench/plots.py

## lm-evaluation-harness on a trained model, exported to the Hugging Face format (standard tasks download
## their datasets: needs the network).  make eval MODEL_DIR=outputs/demo EVAL_TASKS=lambada_openai,hellaswag
MODEL_DIR ?= outputs/demo
EVAL_TASKS ?= lambada_openai,hellaswag,piqa,arc_easy
HF_DIR ?= hf/$(notdir $(MODEL_DIR))
eval: $(VENV)/.installed
	$(PY) main.py export --model-dir $(MODEL_DIR) --format hf --output $(HF_DIR)
	$(PY) -m lm_eval --model hf --model_args pretrained=$(HF_DIR),trust_remote_code=True \
		--tasks $(EVAL_TASKS) --device cpu --batch_size 8 --output_path $(HF_DIR)-lm_eval

clean:
	rm -rf $(VENV) .pytest_cache
