# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU installs pin torch to the cached CPU wheel (see constraints-cpu.txt); GPU images pass CONSTRAINTS=
CONSTRAINTS ?= constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup demo test bench info clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_C) -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m jobs.demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/moe_layer.py

info: setup
	$(PY) -m deepomni.cli info --preset deepseek-v2-lite

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
