# `make demo` and `make test` do all set-up themselves: a .venv, torch (the CPU build where there is no
# NVIDIA GPU, so a bare requirement cannot pull a multi-GB CUDA build), and this package with its test extras.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.cogrt-installed
DEMO_MODEL ?= .cache/demo-model
PROMPT  ?= a red circle moving right on a black background

.PHONY: install test demo clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no nvidia-smi: installing the CPU build of torch (and the Triton its kernel tests interpret)"; \
		$(PY) -m pip install -q torch==2.13.0 triton==3.6.0; \
	fi
	rm -rf cogrt.egg-info  # an old layout's metadata here would shadow the installed entry points
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# lint-imports checks the layers (pyproject.toml's contracts) before the suite runs. Three pytest-xdist workers, even
# on 2 cores: much of the suite waits on processes it starts (Ray replicas, torchrun ranks, CLI children). On a
# 2-core machine one process took 1,164 s, two workers 942 s and three 878 s (tests/conftest.py groups the Ray tests).
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --timeout=900 -n 3 --dist loadgroup

# The demo runs the bundled tiny model (models/cogrt-tiny); without it, a random-weight one from the presets.
demo: install
	@if [ -d models/cogrt-tiny ]; then model=models/cogrt-tiny; else \
		[ -d $(DEMO_MODEL) ] || $(VENV)/bin/cogrt random-checkpoint $(DEMO_MODEL) --preset tiny-5b; \
		model=$(DEMO_MODEL); fi; \
	$(VENV)/bin/cogrt generate "$(PROMPT)" --model $$model --frames 49 --height 128 --width 128 \
		--steps 50 --seed 0 -o out/demo.mp4

clean:
	rm -rf $(VENV) .cache out
