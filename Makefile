# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# exact versions of everything (the package itself declares ranges)
CONSTRAINTS ?= constraints/constraints-3.11.txt
PYTEST_ARGS ?=
LINT_PATHS := $(wildcard airflow_provider_llmq tests dags benchmarks scripts)

.PHONY: install test test-slow test-cluster test-browser test-oldest test-wheel test-preinstalled-spark test-gateway lint demo bench clean

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -m "not slow and not cluster and not browser and not gateway" $(PYTEST_ARGS)

# scale, soak and kill tests (minutes); CI runs them after the default suite
test-slow: install
	$(PY) -m pytest -m "slow and not cluster and not browser and not gateway" $(PYTEST_ARGS)

# a Spark standalone master + two workers and a Spark Connect server on 127.0.0.1 (minutes)
test-cluster: install
	$(PY) -m pytest -m cluster $(PYTEST_ARGS)

# the Airflow UI in a real browser: airflow standalone + Debian's chromium driven by Playwright
# (no browser download); screenshots in $$LLMQ_BROWSER_ARTIFACTS (default tests/browser/artifacts/)
test-browser: install
	test -x /usr/bin/chromium || { test "$$(id -u)" = 0 && apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } \
		|| { echo "install Debian's chromium: sudo apt-get install -y chromium chromium-driver"; exit 1; }
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[browser]'
	$(PY) -m pytest -m browser tests/browser $(PYTEST_ARGS)

# the oldest Spark llmq supports: a fresh venv with pyspark 4.0.1, everything else as constrained
OLDEST_VENV ?= .venv-oldest
test-oldest:
	test -x $(OLDEST_VENV)/bin/python || python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	grep -vE '^(pyspark|pyspark-client)==' $(CONSTRAINTS) > $(OLDEST_VENV)/constraints.txt
	printf 'pyspark==4.0.1\npyspark-client==4.0.1\n' >> $(OLDEST_VENV)/constraints.txt
	$(OLDEST_VENV)/bin/python -m pip install -q -c $(OLDEST_VENV)/constraints.txt -e '.[test]'
	$(OLDEST_VENV)/bin/python -m pytest -m "not slow and not cluster and not browser" $(PYTEST_ARGS)

# the package as a user installs it: sdist and wheel built, the wheel installed into a fresh venv with
# no constraints and not editable (pip picks the newest releases the ranges allow), one operator run
# with dag.test() against the mock server (scripts/install_smoke.py prints what pip resolved)
WHEEL_VENV ?= .venv-wheel
test-wheel:
	rm -rf $(WHEEL_VENV) dist && python3 -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q --upgrade pip build
	$(WHEEL_VENV)/bin/python -m build -q --outdir dist .
	$(WHEEL_VENV)/bin/python -m pip install -q "$$(ls dist/*.whl)[testing]"
	cd /tmp && $(CURDIR)/$(WHEEL_VENV)/bin/python $(CURDIR)/scripts/install_smoke.py

# the same next to a Spark that was there first, as on a cluster image: llmq must keep pyspark 4.0.x
PREINSTALLED_VENV ?= .venv-preinstalled
PREINSTALLED_PYSPARK ?= 4.0.1
test-preinstalled-spark:
	rm -rf $(PREINSTALLED_VENV) dist && python3 -m venv $(PREINSTALLED_VENV)
	$(PREINSTALLED_VENV)/bin/python -m pip install -q --upgrade pip build
	$(PREINSTALLED_VENV)/bin/python -m pip install -q 'pyspark[connect]==$(PREINSTALLED_PYSPARK)'
	$(PREINSTALLED_VENV)/bin/python -m build -q --outdir dist .
	$(PREINSTALLED_VENV)/bin/python -m pip install -q "$$(ls dist/*.whl)[testing]"
	cd /tmp && $(CURDIR)/$(PREINSTALLED_VENV)/bin/python $(CURDIR)/scripts/install_smoke.py \
		--expect-pyspark $(PREINSTALLED_PYSPARK)

# llmq through LiteLLM's proxy, a real gateway (offline: models answer with mock_response or from a
# local mock server). The proxy runs from a venv of its own: its pins conflict with Airflow's.
LITELLM_VENV ?= .venv-gateway
$(LITELLM_VENV)/.installed-stamp: constraints/litellm-3.11.txt
	test -x $(LITELLM_VENV)/bin/python || python3 -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install -q -c constraints/litellm-3.11.txt 'litellm[proxy]'
	touch $@

test-gateway: install $(LITELLM_VENV)/.installed-stamp
	LLMQ_LITELLM=$(CURDIR)/$(LITELLM_VENV)/bin/litellm $(PY) -m pytest -m gateway $(PYTEST_ARGS)

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(WHEEL_VENV) $(PREINSTALLED_VENV) $(LITELLM_VENV) dist .demo .pytest_cache .mypy_cache .ruff_cache
