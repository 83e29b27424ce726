# The two commands in the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test prometheus jemalloc clean

$(STAMP): pyproject.toml requirements/cpu-torch.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/cpu-torch.txt
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP) jemalloc
	$(BIN)/streamrec demo $(ARGS)

test: $(STAMP) prometheus jemalloc
	$(BIN)/python -m pytest -q $(ARGS)

# promtool + prometheus for the deploy tests (Debian package); best effort off Debian/root.
prometheus:
	@command -v promtool >/dev/null 2>&1 || apt-get install -y -q prometheus >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q prometheus >/dev/null 2>&1) \
	  || echo "warning: could not install prometheus; run: apt-get install -y prometheus"

# jemalloc for the worker (stream_app/allocator.py): flat RSS over long runs. Best effort;
# without it the worker warns and runs on glibc malloc.
jemalloc:
	@(/sbin/ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2) \
	  || apt-get install -y -q libjemalloc2 >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libjemalloc2 >/dev/null 2>&1) \
	  || echo "warning: could not install jemalloc; run: apt-get install -y libjemalloc2"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
