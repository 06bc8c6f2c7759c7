# The two Quick start commands of README.md live here; both bootstrap what they need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODEL   ?= smollm2-135m
PROMPT  ?= What is the capital of France?

.PHONY: demo test lint venv models host-deps test-host-deps clean

$(STAMP): pyproject.toml tools/dev/bootstrap.sh
	bash tools/dev/bootstrap.sh $(PY) $(VENV)
	touch $(STAMP)

venv: $(STAMP)

TEST_MODELS := smollm2-135m qwen2.5-coder-0.5b gemma3-270m

models: $(STAMP)
	for m in $(TEST_MODELS); do $(BIN)/ukgpu models pull $$m || exit 1; done

host-deps:
	bash tools/dev/host_deps.sh

test-host-deps:
	bash tools/dev/host_deps.sh --tests

# Command 1: the main job on the embedded default model.
demo: $(STAMP) host-deps
	$(BIN)/ukgpu demo -m $(MODEL) -p "$(PROMPT)"

# The fast lane (well under a minute): ruff, mypy, the layering and size-budget tests.
lint: $(STAMP)
	bash tools/dev/lint.sh $(BIN)

# Command 2: the whole test suite, after the fast lane.
test: $(STAMP) lint test-host-deps models
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
