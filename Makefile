# `make demo` and `make test` create .venv when missing, install everything, then run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.veil-installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $$(scripts/find_python.sh) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) bench/he_digits.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
