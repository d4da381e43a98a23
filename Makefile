# Fresh machine: `make run` (main job on the bundled data) or `make test`.
# Both create the environment first if needed; `make setup` creates it alone.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Python 3.10 is required by TFX 1.16; pyenv installs it on every machine here.
PYTHON310 ?= $(shell if command -v pyenv >/dev/null 2>&1; then echo "$$(pyenv root)/versions/3.10.13/bin/python"; else command -v python3.10; fi)
STAMP := $(VENV)/.installed
# Tests and runs are CPU-only here; keep TF's log noise down.
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED ?= 0
# uv verifies TLS with its bundled roots; machines behind a TLS-inspecting proxy
# need the system bundle, which pip already uses.
ifeq ($(SSL_CERT_FILE),)
ifneq ($(wildcard /etc/ssl/certs/ca-certificates.crt),)
export SSL_CERT_FILE := /etc/ssl/certs/ca-certificates.crt
endif
endif

.PHONY: setup run train test lock bench-pipeline clean

setup: $(STAMP)

$(STAMP): requirements.lock setup.py
	@test -x "$(PYTHON310)" || { echo "Python 3.10 not found (looked for $(PYTHON310)); set PYTHON310=/path/to/python3.10" >&2; exit 1; }
	$(PYTHON310) -m venv $(VENV)
	# uv lives inside the venv so nothing is needed on the machine but Python 3.10.
	$(PY) -m pip install -q --disable-pip-version-check "pip==24.2" "setuptools==75.1.0" "wheel==0.44.0" "uv==0.13.9"
	$(VENV)/bin/uv pip install --python $(PY) -r requirements.lock
	# compat mode: a plain path entry, so packages added later import without reinstalling.
	$(VENV)/bin/uv pip install --python $(PY) --no-deps --config-settings editable_mode=compat -e .
	touch $(STAMP)

lock: $(STAMP)
	$(VENV)/bin/uv pip compile setup.py --extra test --python-version 3.10 --python-platform x86_64-unknown-linux-gnu -o requirements.lock

run: $(STAMP)
	$(VENV)/bin/mmoe pipeline run --data features/data/census-income.sample.gz --train-steps 600

# The in-process training job alone (no TFX): preprocess, train, evaluate.
train: $(STAMP)
	$(VENV)/bin/mmoe train --data features/data/census-income.sample.gz --task-group 1 --arch mmoe --out runs/census-sample --overwrite

bench-pipeline: $(STAMP)
	$(PY) benchmarks/pipeline.py

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
