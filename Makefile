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
        notebooks benchmarks clean flower lock check-lock test-colab

help:
	@echo "make book    - set up everything and build the HTML book into _build/html"
	@echo "make test    - helpers' tests, Colab cells, nbval on every chapter, strict book build, browser check, lock check"
	@echo "make test-portable - nbval with ATEN_CPU_CAPABILITY=avx2 (outputs must not depend on the CPU)"
	@echo "make notebooks - re-execute every chapter in place (refreshes stored outputs)"
	@echo "make benchmarks - time every chapter and the simulator vs centralized training"
	@echo "make flower  - run the book's Flower app on a loopback SuperLink + 2 SuperNodes (Chapter 7)"
	@echo "make lock    - regenerate requirements.txt for every platform and Python (UPGRADE=1 lets versions move)"
	@echo "make check-lock - resolve requirements.txt for Linux x86_64/aarch64, macOS arm64, Windows x86_64 x Python 3.11-3.13"

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
	$(PY) -m pytest -q tests --ignore=tests/test_browser.py --ignore=tests/test_colab.py

# Each chapter's Colab cell in a fresh venv with another torch and no myst-nb (builds a venv: minutes).
test-colab: data
	$(PY) -m pytest -q -p no:cacheprovider tests/test_colab.py

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

test: test-helpers test-colab test-notebooks book-strict test-browser check-lock

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

# ---- the lock: one requirements.txt for every reader's machine ---------------------------------------
# `uv pip compile --universal` writes environment markers (CUDA wheels only where torch's own metadata asks for
# them: Linux); pip alone cannot check other platforms from one machine, because it evaluates markers against
# the machine it runs on (`pip install --platform win_amd64` here still asks for torch's Linux-only nvidia-nccl).
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
LOCK_PYTHON := 3.11.5
LOCK_PLATFORMS := x86_64-manylinux_2_28 aarch64-manylinux_2_28 aarch64-apple-darwin x86_64-pc-windows-msvc
LOCK_PYTHONS := 3.11.5 3.12 3.13

$(UV): $(STAMP)
	$(PY) -m pip install --quiet uv==$(UV_VERSION)

lock: $(UV)
	@keep=$$(mktemp); grep -v '^#' requirements.txt | sed 's/ *;.*//' > $$keep; \
	$(UV) pip compile pyproject.toml --extra deploy --extra download --extra flower --extra privacy --extra test --extra book --universal \
	  --python-version $(LOCK_PYTHON) --no-header --no-annotate -q $(if $(UPGRADE),,-c $$keep) -o $$keep.new; \
	{ grep '^#' requirements.txt; cat $$keep.new; } > $$keep.lock; mv $$keep.lock requirements.txt; rm -f $$keep $$keep.new; \
	echo "requirements.txt: $$(grep -c '==' requirements.txt) pins"

# Pure-Python packages published only as source (no wheel): pip builds them anywhere. antlr4-python3-runtime
# comes with executorch (via hydra-core/omegaconf); every other package must resolve to a wheel.
SDIST_ONLY := antlr4-python3-runtime
check-lock: $(UV)
	@failed=""; for platform in $(LOCK_PLATFORMS); do for python in $(LOCK_PYTHONS); do \
	  if out=$$(MACOSX_DEPLOYMENT_TARGET=14.0 $(UV) pip compile requirements.txt --python-platform $$platform \
	      --python-version $$python --only-binary :all: $(foreach p,$(SDIST_ONLY),--no-binary $(p)) --no-header --no-annotate -q 2>&1); then \
	    echo "check-lock: $$platform, Python $$python: resolved, $$(grep -c '==' <<< "$$out") wheels"; \
	  else echo "check-lock: $$platform, Python $$python: FAILED"; echo "$$out" | head -5; failed="$$failed $$platform/$$python"; fi; \
	done; done; \
	if [ -n "$$failed" ]; then echo "check-lock failed:$$failed"; exit 1; fi

