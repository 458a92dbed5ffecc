# Two commands do everything on a fresh clone: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA := datasets/mnist5k-16x16.zip
DEMO_OUT := runs/demo

.PHONY: install demo test lint

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

$(DEMO_DATA): | install
	$(PY) dataset_tool.py --source=mnist5k --dest=$(DEMO_DATA) --resolution=16x16

# Build MNIST-5k at 16x16, train the demo network, then sample a grid from the last snapshot.
demo: install $(DEMO_DATA)
	$(PY) train.py --outdir=$(DEMO_OUT) --data=$(DEMO_DATA) --preset=demo-mnist16
	run=$$(ls -d $(DEMO_OUT)/*/ | tail -n 1); \
	snap=$$(ls $$run/network-snapshot-*.pt | tail -n 1); \
	$(PY) generate.py --network=$$snap --outdir=$$run/samples --seeds=0-63 --grid-png=$$run/samples.png && \
	echo "Demo done: samples in $$run/samples.png, log in $$run/log.txt"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q
