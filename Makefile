# Two entry points on a fresh clone: `make demo` and `make test`.
# torch is pinned first so pip takes the local CPU wheel instead of resolving
# a newer CUDA build; setup.cfg only asks for torch>=2.1, which 2.13.0 satisfies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-faults bench transfer transfer-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .[test]
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/videolm demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# Heavy fault-injection runs (docs/reliability.md); `make test` runs a fast subset.
test-faults: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m faults tests

bench: $(STAMP)
	$(PY) benchmarks/bench_extract.py > bench_extract.json
	$(PY) benchmarks/bench_quantize.py > bench_quantize.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_train.py > bench_train.json
	$(PY) benchmarks/bench_retrieval.py > bench_retrieval.json
	$(PY) benchmarks/bench_import.py > bench_import.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_memory.py > bench_memory.json
	@echo "wrote bench_extract.json, bench_quantize.json, bench_train.json, bench_retrieval.json, bench_import.json and bench_memory.json"

# The transfer study (docs/transfer.md): about 85 minutes on 2 CPU cores; resumable.
transfer: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_transfer.py --out transfer_out

transfer-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_transfer.py --quick --out transfer_quick

clean:
	rm -rf $(VENV) demo_out bench_out transfer_out transfer_quick *.egg-info bench_*.json
