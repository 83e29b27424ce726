# The two commands the README gives: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where the torch pin (requirements/cpu-torch.txt) comes from: PyTorch's CPU wheels, which
# outrank PyPI's build of the same version (PyPI's Linux wheel is the CUDA build, several GB).
# GPU hosts: make setup TORCH_INDEX_URL=https://pypi.org/simple (docs/model.md, "GPU").
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?= $(TORCH_CPU_INDEX)
TORCH_PIN := $(shell sed -n 's/^\(torch==[^ ]*\).*/\1/p' requirements/cpu-torch.txt)

.PHONY: setup demo test prometheus jemalloc clean

$(STAMP): pyproject.toml requirements/cpu-torch.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# a CPU build the configured indexes already hold (a local wheel) is taken as is: no index
	@# the host may not reach is asked; else the pin from TORCH_INDEX_URL
	if [ "$(TORCH_INDEX_URL)" = "$(TORCH_CPU_INDEX)" ] && $(BIN)/pip install -q "$(TORCH_PIN)+cpu" 2>/dev/null; \
	then :; else $(BIN)/pip install -q --extra-index-url $(TORCH_INDEX_URL) -r requirements/cpu-torch.txt; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP) jemalloc
	$(BIN)/streamrec demo $(ARGS)

test: $(STAMP) prometheus jemalloc
	$(BIN)/python -m pytest -q $(ARGS)

# $(call apt_best_effort,CHECK,PACKAGE): install PACKAGE unless CHECK succeeds; best effort
# off Debian/root (a warning, not a failure).
apt_best_effort = @($(1)) >/dev/null 2>&1 || apt-get install -y -q $(2) >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(2) >/dev/null 2>&1) \
	  || echo "warning: could not install $(2); run: apt-get install -y $(2)"

# promtool + prometheus for the deploy tests (Debian package).
prometheus:
	$(call apt_best_effort,command -v promtool,prometheus)

# jemalloc for the worker (stream_app/runtime/allocator.py): flat RSS over long runs. Without it
# the worker warns and runs on glibc malloc.
jemalloc:
	$(call apt_best_effort,/sbin/ldconfig -p | grep -q libjemalloc.so.2,libjemalloc2)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
