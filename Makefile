# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Optional extras for `make run`/`make install`, comma-separated: `make run EXTRAS=easyocr`
# adds EasyOCR and torch (several GB). The base install (RapidOCR) has no torch.
EXTRAS ?=
# `make test`, `make lint` and the benchmarks install every extra and test both engines.
ALL_EXTRAS := test,easyocr
comma := ,
RUN_STAMP := $(VENV)/.installed-base$(if $(EXTRAS),-$(subst $(comma),-,$(EXTRAS)))
ALL_STAMP := $(VENV)/.installed-all
APT_PACKAGES := dcmtk orthanc orthanc-dicomweb dicom3tools tesseract-ocr chromium chromium-driver \
	postgresql
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run install test venv system-deps lint bench bench-pixels clean

$(VENV)/bin/pip:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(VENV)/bin/pip
	$(VENV)/bin/pip install --quiet -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	touch $@

$(ALL_STAMP): pyproject.toml | $(VENV)/bin/pip
	$(VENV)/bin/pip install --quiet -e '.[$(ALL_EXTRAS)]'
	touch $@

install: $(RUN_STAMP)

venv: $(ALL_STAMP)

# Debian packages the tests use as real peers: DCMTK (storescu/echoscu), Orthanc (research
# PACS), dicom3tools (dciodvfy), Tesseract (independent OCR), PostgreSQL (the replica tests'
# own temporary cluster, tests/pgcluster.py). Installed only when missing.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

run: install
	$(VENV)/bin/deid-node serve --config config/deid-node.toml

test: venv system-deps
	$(VENV)/bin/ruff check deid_node tests scripts
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check deid_node tests scripts
	$(VENV)/bin/ruff format --check deid_node tests scripts

bench: venv system-deps
	$(PY) scripts/bench.py

bench-pixels: venv
	$(PY) scripts/bench_pixels.py

clean:
	rm -rf $(VENV) build *.egg-info
