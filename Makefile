# Two entry points for a fresh machine (Python >= 3.11 and make):
#   make demo   install, then train on sample_data, predict, export TFLite
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Offline machines: use a pre-filled TF Hub cache when one sits beside the project.
SHARED_CACHE = $(wildcard ../shared/tfhub_cache)
DEMO_ENV = $(if $(TFHUB_CACHE_DIR),,$(if $(SHARED_CACHE),TFHUB_CACHE_DIR=$(abspath $(SHARED_CACHE)),))

.PHONY: install demo test test-heavy bench clean

$(BIN)/tlcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/tlcli

demo: install
	$(DEMO_ENV) $(BIN)/tlcli train sample_data/images --out demo-model --force
	$(BIN)/tlcli predict sample_data/images/red_discs/red_discs_00.jpg --model demo-model --engine tf
	$(BIN)/tlcli export --tflite --model demo-model
	$(BIN)/tlcli predict sample_data/images/green_stripes/green_stripes_00.jpg --model demo-model

test: install
	$(BIN)/python -m pytest -q

test-heavy: install
	$(DEMO_ENV) $(BIN)/python -m pytest -q -m heavy

clean:
	rm -rf demo-model .pytest_cache
