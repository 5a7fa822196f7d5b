# The two commands: `make setup` (install into .venv, then run `transcribe devices`) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup test bench clean

setup: $(VENV)/.installed
	$(VENV)/bin/transcribe --version
	$(VENV)/bin/transcribe devices

# torch first, pinned: 2.13.0 is the CPU build here; an unpinned torch would pull GBs of CUDA wheels.
# Never torchaudio (it breaks `import funasr` on torch 2.13); funasr reads features with kaldi-native-fbank.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) tests/performance/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
