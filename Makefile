# The README's two commands: `make demo` (main job) and `make test` (the tests). Each sets up .venv itself,
# with torch held at 2.13.0 by constraints.txt (a CPU wheel here, the CUDA build on a GPU machine).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.astrea-installed

.PHONY: install demo test lint configs clean

$(STAMP): setup.py pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

configs: install
	$(PY) examples/configs/build_configs.py

clean:
	rm -rf outputs .pytest_cache
