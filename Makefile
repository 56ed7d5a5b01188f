# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is capped at what this machine's disk holds; the code itself needs only torch >= 2.4.
TORCH := "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"

.PHONY: install install-dev demo test lint bench clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed  # a second `make demo` continues runs/quick (or says it is complete): nothing is overwritten
	if [ -f runs/quick/config.yaml ]; then $(PY) -m attnlab train --resume runs/quick; \
	else $(PY) -m attnlab train --config configs/quick.yaml; fi

# Two worker processes, each test file whole in one (its module fixtures built once): the suite is mostly
# single-threaded Python and process start-up, so on 2 cores this halves it (533 s -> 281 s, same 954 tests).
test: $(VENV)/.installed-dev
	$(PY) -m pytest tests -n 2 --dist loadfile

lint: $(VENV)/.installed-dev  # the rules are in pyproject.toml ([tool.ruff])
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .cache
