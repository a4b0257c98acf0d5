# Everything installs into .venv/ at the repository root; no GPU and no Docker needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
REPO   := model_repository

.PHONY: install serve demo test lint typecheck test-tools train-demo evaluate calibrate introspect bench bench-quick clean soak
install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[server,client,eval,dev]'
	touch $(STAMP)

# Serve the bundled demo model with the real tritonserver until Ctrl-C.
serve: install
	$(BIN)/gradtrust serve --model-repository $(REPO)

# Start the server, classify a few real test digits through the client, stop the server.
demo: install
	$(BIN)/python -m gradtrust.tools.demo.run --model-repository $(REPO)

# System tools the tests need: promtool, a Prometheus server, amtool and nginx (Debian's packages).
# nginx: the reverse proxy of deploy/nginx, run against a live server (test_reverse_proxy.py).
test-tools:
	@{ command -v promtool && command -v prometheus && command -v amtool \
	   && { command -v nginx || test -x /usr/sbin/nginx; }; } >/dev/null 2>&1 || { \
	  echo "installing Debian's prometheus, prometheus-alertmanager and nginx for the tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    prometheus prometheus-alertmanager nginx >/dev/null; }

lint: install
	$(BIN)/ruff check server client tests bench examples
	$(BIN)/ruff format --check server client tests bench examples

typecheck: install
	$(BIN)/mypy

test: install test-tools lint typecheck
	$(BIN)/pytest -q

# Re-train the demo classifier deterministically and re-export it (not needed to serve or test).
train-demo: install
	$(BIN)/python -m gradtrust.tools.demo.train --repository $(REPO)

# Misprediction, calibration, corruption and OOD evaluation of every score on the demo
# model; rewrites docs/EVALUATION.md's generated section and docs/img/evaluation/.
evaluate: install
	$(BIN)/gradtrust evaluate --out docs/img/evaluation --docs docs/EVALUATION.md

# Fit TRUST_PROB and the low-trust threshold (flag 5% of traffic) into the demo entry.
calibrate: install
	$(BIN)/gradtrust calibrate --mix corruptions --target flag-rate=0.05

# Train the demo entry's introspective network (1/introspection.onnx) and report both stages.
introspect: install
	$(BIN)/gradtrust introspect --report

# Side-by-side benchmarks (docs/BENCHMARKS.md): in-process ratios, then through tritonserver.
# About 2 + 10 minutes on 2 cores; results in bench/results/. On a GPU host: bench/run_gpu.sh OUT.
bench: install
	$(BIN)/python -m bench.inprocess
	$(BIN)/python -m bench.serving

bench-quick: install
	$(BIN)/python -m bench.inprocess --quick
	$(BIN)/python -m bench.serving --quick

# Soak: 8 client threads over HTTP and gRPC on loopback for 5 minutes (bounded in time and
# count); every answer checked against in-process onnxruntime, server RSS at start and end.
soak: install
	$(BIN)/python -m bench.soak --duration 300 --threads 8 --out bench/results/soak.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
