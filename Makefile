# The two set-up commands of the README:
#   make demo                   set up, then open the quickstart notebook in JupyterLab
#   make demo ARGS=--headless   set up, then run the main job without a browser (trace.json, circuit.html)
#   make test                   set up, then lint, type-check and run every test
#
# Everything installs into .venv in this folder (made with `python3 -m venv`), or into the
# virtual environment that is already active. Never into the system Python: Debian's and
# Ubuntu's refuse `pip install` there (PEP 668, "externally-managed-environment").
PYTHON ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY = $(VENV)/bin/python
PIP = $(PY) -m pip install --quiet --disable-pip-version-check
INSTALLED = $(VENV)/.acdc_viz-installed
ARGS ?=

.PHONY: install demo test lint test-tl3 browser test-binder

install: $(INSTALLED)   ## the package, its tests' tools, and PyTorch's CPU build (never a CUDA one)

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
	$(PIP) -e '.[dev]'
	@touch $@

demo: install       ## the quickstart in JupyterLab; with ARGS=--headless, trace.json and circuit.html
	$(PY) -m acdc_viz demo $(ARGS)

browser:            ## Debian's chromium, for the browser tests and PNG/SVG export
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: the browser tests will be skipped"

lint: install       ## ruff (rules in pyproject.toml) over the repository, pyright (basic) over acdc_viz/
	$(PY) -m ruff check .
	$(VENV)/bin/pyright

test: install browser lint
	$(PY) -m pytest -q -m "not binder"
	$(MAKE) test-tl3
	$(MAKE) test-binder

# TransformerLens 3.x beside everything else: .venv-tl3 holds only transformer-lens 3.9.0 and
# reads the rest from $(VENV) through a .pth file (its own packages come first on sys.path).
test-tl3: install   ## the HookedTransformer tests, in an environment with TransformerLens 3.x
	@test -x .venv-tl3/bin/python || $(PYTHON) -m venv .venv-tl3
	$(PY) -c "import site, sysconfig; print(f'import site; site.addsitedir({sysconfig.get_paths()[\"purelib\"]!r})')" \
	  > "$$(.venv-tl3/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/acdc_viz_base.pth"
	.venv-tl3/bin/python -m pip install --quiet --disable-pip-version-check 'transformer-lens==3.9.0'
	ACDC_VIZ_TL4_PYTHON=$(PY) .venv-tl3/bin/python -m pytest -q tests/test_hooked_transformer.py \
	  tests/test_tl3_families.py

test-binder: install  ## binder/requirements.txt in a fresh venv, the quickstart run in it; prints size and peak memory
	$(PY) -m pytest -q -s -m binder tests/test_binder.py
