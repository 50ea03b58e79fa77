# One entry point for set-up, the demo and the tests; `.ci/run` calls `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
APT_PACKAGES := libtcmalloc-minimal4 libavutil57 libavcodec59 libavformat59 libavdevice59 libavfilter8 libswscale6 libswresample4 \
	espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts \
	wordnet-base sword-text-web diatheke slurmctld slurmd slurm-client munge \
	asterisk-core-sounds-it asterisk-core-sounds-it-wav asterisk-core-sounds-ru asterisk-core-sounds-ru-wav \
	festvox-italp16k festvox-itapc16k festvox-ru fortunes fortunes-min fortunes-it fortunes-ru fortunes-de fortunes-es ffmpeg
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test test-slow test-gpu apt
setup: apt $(STAMP)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "setuptools>=70.1,<82" wheel
	@echo "installing the pinned stack (torch with its CUDA libraries, ~6 GB on a fresh machine: the longest step) ..."
	$(PY) -m pip install --progress-bar on -e ".[teachers,tts,dev]"
	@echo "compiling DeepSpeed's CPU communication op once (cached in $(TORCH_EXTENSIONS_DIR)) ..."
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	@echo "importing the registry teachers once (cached) ..."
	$(PY) -c "from asr.models.registry import REGISTRY, import_registry_model as imp; [imp(n) for n in REGISTRY]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/asr run quickstart

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-gpu: setup
	$(PY) -m pytest -q -m gpu
