# Two entry points for a fresh machine (Python >= 3.11 and make):
#   make demo   install tlcli (the runtime only), then train on sample_data, predict, export TFLite
#   make test   install tlcli with the dev extras, then lint (ruff) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Offline machines: use the pre-filled TF Hub cache in ../shared when there is one. Its module
# entries may arrive as small files holding a relative path (a symlink flattened by copying), so
# its entries are linked, as real symlinks, into tlcli's own TF Hub cache: $TFHUB_CACHE_DIR, else
# ~/.cache/tlcli/tfhub (as tlcli chooses it), where every later `tlcli train` finds them too.
SHARED_CACHE = $(wildcard ../shared/tfhub_cache)
HUB_CACHE = $${TFHUB_CACHE_DIR:-$${TLCLI_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/tlcli}/tfhub}

.PHONY: install install-dev demo test test-lowest test-heavy bench clean hub-cache

$(BIN)/tlcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(BIN)/tlcli
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/tlcli

install-dev: $(VENV)/.dev

hub-cache:
ifneq ($(SHARED_CACHE),)
	@hub="$(HUB_CACHE)"; mkdir -p "$$hub"; \
	for f in $(SHARED_CACHE)/*; do \
	  n=$$(basename "$$f"); \
	  case "$$n" in \
	    *.descriptor.txt) cp -f "$$f" "$$hub/$$n" ;; \
	    *) if [ -d "$$f" ]; then target="$$f"; else target="$(SHARED_CACHE)/$$(cat "$$f")"; fi; \
	       ln -sfn "$$(cd "$$target" && pwd)" "$$hub/$$n" ;; \
	  esac; \
	done
endif

demo: install hub-cache
	$(BIN)/tlcli train sample_data/images --out demo-model --force
	$(BIN)/tlcli predict sample_data/images/red_discs/red_discs_00.jpg --model demo-model --engine tf
	$(BIN)/tlcli export --tflite --model demo-model
	$(BIN)/tlcli predict sample_data/images/green_stripes/green_stripes_00.jpg --model demo-model

# Test processes (pytest-xdist): one per core, at most 4; 0 runs them in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: install-dev
	$(BIN)/ruff check tlcli tests bench sample_data
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

# The CLI, serve and image tests again at the lowest versions pyproject.toml allows (a second venv).
LOWEST = .venv-lowest
test-lowest:
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST)/bin/python -m pip install --quiet -c constraints-lowest.txt -e ".[dev]"
	$(LOWEST)/bin/python -m pip check
	$(LOWEST)/bin/python -m pytest -q tests/test_cli.py tests/test_cli_layout.py tests/test_render.py \
	  tests/test_narrow.py tests/test_pipes.py tests/test_first_hour.py tests/test_serve.py tests/test_images.py \
	  tests/test_head.py tests/test_predict.py

test-heavy: install-dev hub-cache
	$(BIN)/python -m pytest -q -m heavy

bench: install-dev
	$(BIN)/python bench/train_vs_baseline.py
	$(BIN)/python bench/train_vs_baseline.py --memory
	$(BIN)/python bench/deploy.py

# The caches outside the checkout (features, converted backbones, TF Hub models) are not removed:
# they live in ~/.cache/tlcli (or $TLCLI_CACHE_DIR); `rm -rf ~/.cache/tlcli` clears them.
clean:
	rm -rf demo-model .pytest_cache .cache $(LOWEST)
