# The book's two commands are `make book` and `make test`; everything else is a step they use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard book/[0-9][0-9]_*.ipynb))
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.PHONY: help book test venv system-deps data test-helpers test-notebooks test-portable book-strict test-browser \
        notebooks benchmarks clean flower

help:
	@echo "make book    - set up everything and build the HTML book into _build/html"
	@echo "make test    - helpers' tests, nbval on every chapter, strict book build, browser check"
	@echo "make test-portable - nbval with ATEN_CPU_CAPABILITY=avx2 (outputs must not depend on the CPU)"
	@echo "make notebooks - re-execute every chapter in place (refreshes stored outputs)"
	@echo "make benchmarks - time every chapter and the simulator vs centralized training"
	@echo "make flower  - run the book's Flower app on a loopback SuperLink + 2 SuperNodes (Chapter 7)"

# ---- set-up ------------------------------------------------------------------------------
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (flbook)" >/dev/null
	touch $(STAMP)

venv: $(STAMP)

# Debian packages: the Fashion-MNIST system copy and a browser for the page checks (root only).
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  need=""; \
	  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need="$$need dataset-fashion-mnist"; \
	  command -v chromium >/dev/null || need="$$need chromium"; \
	  command -v chromedriver >/dev/null || need="$$need chromium-driver"; \
	  if [ -n "$$need" ]; then \
	    echo "apt-get install$$need"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	  fi; \
	else echo "not root: install dataset-fashion-mnist chromium chromium-driver yourself if they are missing"; fi

data: venv system-deps
	$(PY) -c "import helpers.data as d; tr = d.load_dataset(); te = d.load_dataset(train=False); print(f'Fashion-MNIST ready in {d.default_data_root()}: {len(tr)} train, {len(te)} test')"

# ---- the book ----------------------------------------------------------------------------
book: data
	$(VENV)/bin/jupyter-book build . --builder html
	@echo "open _build/html/index.html"

book-strict: data
	$(VENV)/bin/jupyter-book build . --builder html -W -n --keep-going

# ---- tests -------------------------------------------------------------------------------
test-helpers: data
	$(PY) -m pytest -q tests --ignore=tests/test_browser.py

# One pytest run per chapter, so each chapter's execution time is printed next to its 150 s budget.
test-notebooks: data
	@cd book && failed=""; for nb in $(notdir $(NOTEBOOKS)); do \
	  start=$$(date +%s); \
	  if env $(NBVAL_ENV) ../$(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with ../tests/nbval_sanitize.cfg \
	      -p no:cacheprovider $$nb; then result=passed; else result=FAILED; failed="$$failed $$nb"; fi; \
	  echo "$$nb: nbval $$result in $$(( $$(date +%s) - start )) s (budget 150 s)"; \
	done; \
	if [ -n "$$failed" ]; then echo "nbval failed:$$failed"; exit 1; fi

# nbval with another CPU's vector kernels: this machine's outputs must hold where ATen runs AVX2 code
test-portable:
	@$(MAKE) --no-print-directory test-notebooks NBVAL_ENV="ATEN_CPU_CAPABILITY=avx2"

test-browser: book-strict
	@if [ -f tests/test_browser.py ]; then $(PY) -m pytest -q tests/test_browser.py; fi

test: test-helpers test-notebooks book-strict test-browser

# ---- maintenance -------------------------------------------------------------------------
notebooks: data
	cd book && for nb in $(notdir $(NOTEBOOKS)); do \
	  echo "executing $$nb"; \
	  ../$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 $$nb; \
	done

benchmarks: data
	$(PY) benchmarks/time_notebooks.py
	$(PY) benchmarks/simulator.py

clean:
	rm -rf _build

# ---- Chapter 7: the book's Flower app on Flower's deployment engine ----------------------------
# A SuperLink and 2 SuperNodes on 127.0.0.1 (free ports, state in a temporary folder) run 3 rounds;
# prints the accuracy and the bytes of every round, then stops every process it started.
flower: data
	$(PY) -m helpers.flower.launch
