# The two set-up commands of the README:
#   make demo                   set up, then open the quickstart notebook in JupyterLab
#   make demo ARGS=--headless   set up, then run the main job without a browser (trace.json, circuit.html)
#   make test                   set up, then run every test
PY ?= python3
PIP = $(PY) -m pip install --quiet --disable-pip-version-check
ARGS ?=

.PHONY: install demo test test-tl3 browser test-binder

install:            ## the package, its tests' tools, and PyTorch's CPU build (never a CUDA one)
	$(PIP) torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
	$(PIP) -e '.[dev]'

demo: install       ## the quickstart in JupyterLab; with ARGS=--headless, trace.json and circuit.html
	$(PY) -m acdc_viz demo $(ARGS)

browser:            ## Debian's chromium, for the browser tests and PNG/SVG export
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: the browser tests will be skipped"

test: install browser
	$(PY) -m pytest -q -m "not binder"
	$(MAKE) test-tl3
	$(MAKE) test-binder

test-tl3:           ## the HookedTransformer tests, in an environment with TransformerLens 3.x
	$(PY) -m venv --system-site-packages .venv-tl3
	.venv-tl3/bin/python -m pip install --quiet --disable-pip-version-check 'transformer-lens==3.9.0'
	.venv-tl3/bin/python -m pytest -q tests/test_hooked_transformer.py

test-binder:        ## binder/requirements.txt in a fresh venv, the quickstart run in it; prints size and peak memory
	$(PY) -m pytest -q -s -m binder tests/test_binder.py
