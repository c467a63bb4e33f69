# make demo | make test | make data | make bench -- see README.md
SHELL := /bin/bash
SHARED_DATA ?= ../shared/data
DATA_FILES := data/mixed_train_dataset.jsonl data/mixed_dev_dataset.jsonl
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# Two lanes (README "Which lane"), each its own venv and pinned install set:
#   legacy: transformers 4.33.3 (ChatGLM-6B v1's remote code stops running after it), Python 3.10/3.11,
#           .venv, requirements.txt: ChatGLM-6B v1, ChatGLM2/3, the causal tiny model.
#   modern: transformers 5.25, Python 3.10-3.13, .venv-modern, requirements-modern.txt: GLM-4 (glm, glm4),
#           Qwen2/2.5/3 (qwen2, qwen3), the causal tiny model.
# LANE=legacy|modern picks one; without it the lane follows the Python found (legacy where a 3.10/3.11
# exists), and `make test` runs the suite on every lane this machine can install (what CI does).
# find_python(candidates, versions): the first candidate that runs and is one of the versions. pyenv's
# versions folder is searched too: its shims exist for every version but run only the selected ones.
find_python = $(shell for p in $(1); do command -v $$p >/dev/null 2>&1 && \
	$$p -c "import sys; sys.exit(('%d.%d' % sys.version_info[:2]) not in '$(2)'.split())" 2>/dev/null \
	&& { echo $$p; break; }; done)
pyenv_python = $(lastword $(wildcard $(HOME)/.pyenv/versions/$(1)*/bin/python$(1)))
LEGACY_PYTHON ?= $(call find_python,python3.11 python3.10 $(call pyenv_python,3.11) $(call pyenv_python,3.10) python3,3.10 3.11)
# 3.12 first: the newest Python the lane is tested on (CI), and torch 2.13.0 has wheels for it.
MODERN_PYTHON ?= $(call find_python,python3.12 $(call pyenv_python,3.12) python3.13 $(call pyenv_python,3.13) \
	python3.11 python3.10 python3,3.10 3.11 3.12 3.13)
LANE_GIVEN := $(filter command line environment,$(origin LANE))
LANE ?= $(if $(LEGACY_PYTHON),legacy,modern)
# Where each lane's venv lives (set these, not VENV, to move them: make test runs both lanes).
LEGACY_VENV ?= .venv
MODERN_VENV ?= .venv-modern
ifeq ($(LANE),legacy)
VENV := $(LEGACY_VENV)
PYTHON ?= $(LEGACY_PYTHON)
LANE_REQUIREMENTS := requirements.txt
else ifeq ($(LANE),modern)
VENV := $(MODERN_VENV)
PYTHON ?= $(MODERN_PYTHON)
LANE_REQUIREMENTS := requirements-modern.txt
else
$(error LANE=$(LANE): expected legacy or modern)
endif
PY := $(VENV)/bin/python
# The lanes make test runs: the one asked for, else every lane a Python here can install.
TEST_LANES := $(if $(LANE_GIVEN),$(LANE),$(if $(LEGACY_PYTHON),legacy) $(if $(MODERN_PYTHON),modern))

.PHONY: venv data system-deps test test-lane test-fast lint demo app bench bench-modern clean figures

venv: $(VENV)/.installed

$(VENV)/.installed: $(LANE_REQUIREMENTS) requirements-common.txt requirements-test.txt
	@if [ -z "$(PYTHON)" ]; then \
		if [ "$(LANE)" = legacy ]; then \
		echo "error: the legacy lane needs Python 3.10 or 3.11 (tokenizers 0.13.3, required by transformers 4.33.3,"; \
		echo "       has no wheels for newer Pythons). Install python3.11 (e.g. pyenv install 3.11) and rerun, pass"; \
		echo "       PYTHON=/path, or use the modern lane: make venv LANE=modern (GLM-4, Qwen; not ChatGLM-6B)."; \
		else echo "error: the modern lane needs Python 3.10-3.13; pass PYTHON=/path."; fi; \
		exit 1; fi
	@echo "creating $(VENV) ($(LANE) lane) with $(PYTHON) ($$($(PYTHON) --version))"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LANE_REQUIREMENTS) -r requirements-test.txt 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import torch, transformers, peft, streamlit; print('installed torch', torch.__version__, 'transformers', transformers.__version__)"
	@touch $@

data: $(DATA_FILES)

data/%.jsonl:
	@mkdir -p data
	@if [ -f "$(SHARED_DATA)/$*.jsonl" ]; then cp "$(SHARED_DATA)/$*.jsonl" $@ && echo "copied $(SHARED_DATA)/$*.jsonl -> $@"; \
	else echo "error: $@ is missing and $(SHARED_DATA)/$*.jsonl does not exist."; \
		echo "       Put the reference files (mixed_train_dataset.jsonl, mixed_dev_dataset.jsonl, from the ChatGLM-6B"; \
		echo "       LoRA tutorial's data/ folder) into data/, or run: make data SHARED_DATA=/path/to/folder"; exit 1; fi

# Debian chromium for the browser tests and a CJK font for Chinese plot labels.
system-deps:
	@if command -v chromium >/dev/null 2>&1 && fc-list 2>/dev/null | grep -qi "noto sans cjk"; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk >/dev/null; \
	else echo "error: install chromium and fonts-noto-cjk: sudo apt-get install -y chromium fonts-noto-cjk"; exit 1; fi

test: data system-deps
	@if [ -z "$(strip $(TEST_LANES))" ]; then echo "error: no Python 3.10-3.13 found for either lane"; exit 1; fi
	@for lane in $(TEST_LANES); do echo "== the $$lane lane =="; \
		$(MAKE) --no-print-directory test-lane LANE=$$lane || exit 1; done

# The whole suite on one lane (the tests of the other lane's families are reported as skipped, with why).
test-lane: venv data system-deps
	$(PY) -m pytest -q -rs

test-fast: venv data
	$(PY) -m pytest -q -m "not slow and not e2e"

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf .venv .venv-modern runs .pytest_cache

# The CPU demo: builds runs/demo/merged with finetune.demo (7.6-11.2 min measured on 2 cores, idle or loaded) unless it exists,
# then serves it. `rm -rf runs/demo` (or python -m finetune.demo --force) rebuilds it.
demo: venv data system-deps
	@if [ -d runs/demo/merged ]; then echo "runs/demo/merged exists: serving it (rm -rf runs/demo to rebuild)"; \
	else $(PY) -m finetune.demo --output-dir runs/demo; fi
	@$(MAKE) --no-print-directory app APP_MODEL=runs/demo/merged

# The README's demo metric figures, regenerated (two demo runs, ~16 min on 2 cores) and compared: one line
# per figure, same or CHANGED. make figures FIGURES_ARGS=--write puts the measured ones into README.md.
FIGURES_ARGS ?=
figures: venv data
	$(PY) -m tools.figures $(FIGURES_ARGS)

# Serve an existing merged model: make app [APP_MODEL=runs/NAME/merged] [APP_PORT=8501]
APP_MODEL ?= runs/demo/merged
APP_PORT ?= 8501
app: venv
	@echo "starting the app on http://localhost:$(APP_PORT) (model $(APP_MODEL)); Ctrl-C stops it"
	$(VENV)/bin/streamlit run app.py --server.port $(APP_PORT) --server.headless true \
		--browser.gatherUsageStats false --server.maxUploadSize 20 --server.fileWatcherType none \
		-- --model $(APP_MODEL)

# CPU benchmarks (bench/README.md): each prints a RATIO line naming the family it measured, against a
# baseline run in the same process; logs go to runs/bench/. Training and labelling on the causal tiny model
# and on the ChatGLM-6B v1 and ChatGLM2 test doubles (legacy lane), labelling on Ray Data with 1 and 2 CPU actors
# against the single-process CLI (bench.label_ray), labelling on a Qwen3 tiny model (modern lane, bench-modern).
# The labelling models are trained once and kept in
# runs/bench/models (bench.models; the first run adds ~16 min for that). The GPU one only dry-runs here.
BENCH_LOGS ?= runs/bench
BENCH_FAMILIES := causal chatglm_v1 chatglm2
# Per-family flags, expanded by make (a shell loop variable cannot name a make variable).
# v1's 130,528-row output layer makes a CPU step of its fixed-padding baseline ~2 s: fewer steps for it.
BENCH_TRAIN_ARGS_causal :=
BENCH_TRAIN_ARGS_chatglm_v1 := --steps 16 --rounds 4 --dev-rows 32
BENCH_TRAIN_ARGS_chatglm2 := --steps 56 --rounds 8
bench: venv data
	@if [ "$(LANE)" != legacy ]; then echo "error: make bench measures the ChatGLM families: it needs the legacy lane"; \
		exit 1; fi
	@mkdir -p $(BENCH_LOGS)
	set -o pipefail; $(foreach f,$(BENCH_FAMILIES),$(PY) -m bench.train_throughput --family $(f) \
		$(BENCH_TRAIN_ARGS_$(f)) 2>&1 | tee $(BENCH_LOGS)/train_throughput_$(f).log &&) true
	set -o pipefail; for family in $(BENCH_FAMILIES); do \
		$(PY) -m bench.label_throughput --family $$family 2>&1 | tee $(BENCH_LOGS)/label_throughput_$$family.log \
			|| exit 1; done
	set -o pipefail; $(PY) -m bench.label_memory 2>&1 | tee $(BENCH_LOGS)/label_memory.log
	set -o pipefail; $(PY) -m bench.label_ray 2>&1 | tee $(BENCH_LOGS)/label_ray.log
	set -o pipefail; $(PY) -m bench.gpu.run_gpu_bench --dry-run 2>&1 | tee $(BENCH_LOGS)/gpu_dry_run.log
	$(MAKE) --no-print-directory bench-modern LANE=modern
	@echo; echo "== benchmark ratios (logs in $(BENCH_LOGS)/) =="; \
	for family in $(BENCH_FAMILIES); do grep -h "^RATIO" $(BENCH_LOGS)/train_throughput_$$family.log; done; \
	for family in $(BENCH_FAMILIES); do grep -h "^RATIO" $(BENCH_LOGS)/label_throughput_$$family.log; done; \
	grep -h "^RATIO" $(BENCH_LOGS)/label_memory.log; grep -h "^RATIO" $(BENCH_LOGS)/label_ray.log; \
	grep -h "^RATIO" $(BENCH_LOGS)/label_throughput_qwen3.log

# The modern lane's labelling ratio, on a Qwen3 tiny model (trained once, as the others).
bench-modern: venv data
	@mkdir -p $(BENCH_LOGS)
	set -o pipefail; $(PY) -m bench.label_throughput --family qwen3 2>&1 | tee $(BENCH_LOGS)/label_throughput_qwen3.log
