# Two entry points for a fresh machine (Python >= 3.11 and make):
#   make demo   install, then train on sample_data, predict, export TFLite
#   make test   install, then lint (ruff) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Offline machines: use the pre-filled TF Hub cache in ../shared when there is one. Its module
# entries may arrive as small files holding a relative path (a symlink flattened by copying), so
# a local copy of the cache with real symlinks is made in .cache/tfhub.
SHARED_CACHE = $(wildcard ../shared/tfhub_cache)
HUB_CACHE = .cache/tfhub
DEMO_ENV = $(if $(TFHUB_CACHE_DIR),,$(if $(SHARED_CACHE),TFHUB_CACHE_DIR=$(abspath $(HUB_CACHE)),))

.PHONY: install demo test test-heavy bench clean hub-cache

$(BIN)/tlcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/tlcli

hub-cache:
ifneq ($(SHARED_CACHE),)
	@mkdir -p $(HUB_CACHE)
	@for f in $(SHARED_CACHE)/*; do \
	  n=$$(basename "$$f"); \
	  case "$$n" in \
	    *.descriptor.txt) cp -f "$$f" "$(HUB_CACHE)/$$n" ;; \
	    *) if [ -d "$$f" ]; then target="$$f"; else target="$(SHARED_CACHE)/$$(cat "$$f")"; fi; \
	       ln -sfn "$$(cd "$$target" && pwd)" "$(HUB_CACHE)/$$n" ;; \
	  esac; \
	done
endif

demo: install hub-cache
	$(DEMO_ENV) $(BIN)/tlcli train sample_data/images --out demo-model --force
	$(BIN)/tlcli predict sample_data/images/red_discs/red_discs_00.jpg --model demo-model --engine tf
	$(BIN)/tlcli export --tflite --model demo-model
	$(BIN)/tlcli predict sample_data/images/green_stripes/green_stripes_00.jpg --model demo-model

test: install
	$(BIN)/ruff check tlcli tests bench sample_data
	$(BIN)/python -m pytest -q --durations=15

test-heavy: install hub-cache
	$(DEMO_ENV) $(BIN)/python -m pytest -q -m heavy

bench: install
	$(BIN)/python bench/train_vs_baseline.py
	$(BIN)/python bench/train_vs_baseline.py --memory
	$(BIN)/python bench/deploy.py

clean:
	rm -rf demo-model .pytest_cache .cache
