# Two commands do everything on a fresh clone:
#   make demo   - set up .venv, train the demo preset on the built-in Fashion-MNIST (~7 min on 2 cores), write a sample grid
#   make demo-quick - the same two commands in seconds (a smoke test; the samples are noise)
#   make test   - set up .venv, run the test suite (it includes the strict documentation build)
#   make docs   - build the documentation site into site/ (mkdocs, material theme)
PY      ?= python3
VENV    ?= .venv
# The CPU build of torch (pip finds it locally on the project's machines; elsewhere it comes from PyPI).
TORCH   ?= torch==2.13.0
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.edm2-installed

.PHONY: venv demo demo-quick test docs clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,vae,metrics,docs]"
	# FID's Inception (torch-fidelity): --no-deps, as its metadata asks for torchvision, which edm2 never imports
	$(BIN)/pip install -q --disable-pip-version-check --no-deps "torch-fidelity==0.4.0"
	touch $(STAMP)

venv: $(STAMP)

# The recipe is the demo preset (src/edm2/presets.py; chosen by measurement, BENCHMARKS.md "Demo recipe").
# --net demo-run samples its latest snapshot of the longest tracked EMA (sigma_rel 0.10), guided by the
# run's own first snapshot (autoguidance, weight 2), with 16 DPM-Solver++(2M) steps.
# --seeds-per-class 10: seeds 0-9 are class 0, 10-19 class 1, ..., so row r of samples.png is class r.
demo: $(STAMP)
	$(BIN)/edm2 train --outdir demo-run --preset demo --grid 10
	$(BIN)/edm2 generate --net demo-run --gnet demo-run/snapshot-000000004096-0.050.safetensors --guidance 2 \
		--solver dpm++2m --steps 16 --outdir demo-run/samples --seeds 0-99 --seeds-per-class 10 --grid demo-run/samples.png

demo-quick: $(STAMP)
	$(BIN)/edm2 train --outdir demo-quick --preset demo --duration 256 --snapshot 128 --checkpoint 256 --grid 0
	$(BIN)/edm2 generate --net demo-quick --gnet demo-quick/snapshot-000000000128-0.050.safetensors --guidance 2 \
		--solver dpm++2m --steps 4 --outdir demo-quick/samples --seeds 0-9 --seeds-per-class 1 --grid demo-quick/samples.png

test: $(STAMP)
	$(BIN)/python -m pytest tests

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) demo-run demo-quick site
