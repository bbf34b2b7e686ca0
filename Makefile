# The two set-up commands of the README: `make demo` (the main job) and `make test`.
PY ?= python3
PIP = $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test test-tl3 browser

install:            ## the package, its tests' tools, and PyTorch's CPU build (never a CUDA one)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'

demo: install       ## run ACDC on the built-in default model and write trace.json
	acdc-viz run --out trace.json

browser:            ## Debian's chromium, for the browser tests and PNG/SVG export
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: the browser tests will be skipped"

test: install browser
	$(PY) -m pytest -q
	$(MAKE) test-tl3

test-tl3:           ## the HookedTransformer tests, in an environment with TransformerLens 3.x
	$(PY) -m venv --system-site-packages .venv-tl3
	.venv-tl3/bin/python -m pip install --quiet --disable-pip-version-check 'transformer-lens==3.9.0'
	.venv-tl3/bin/python -m pytest -q tests/test_hooked_transformer.py
