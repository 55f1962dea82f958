# CDC pipeline — common tasks. `make` (or `make help`) lists the targets.
#
# The pipeline itself is run by ./run_pipeline.sh (databases via docker compose or
# scripts/local-db.sh, the three binaries in the background, PID files in run/, logs in
# $(LOG_DIR)/). Settings come from the environment or .env (see .env.example).
#
# Variables: COUNT (mutate-burst, 1000), LOG_DIR (logs), CDC_BIN_DIR (use prebuilt binaries).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# A setting from the environment, else from .env (read as the binaries read it), else the default.
dotenv = $(shell scripts/dotenv.sh $(1))
LOG_DIR ?= $(or $(call dotenv,LOG_DIR),logs)
CDC_BIN_DIR ?= $(call dotenv,CDC_BIN_DIR)

# Release binaries: built by `make build`, unless CDC_BIN_DIR points at prebuilt ones.
ifeq ($(strip $(CDC_BIN_DIR)),)
BIN_DIR := $(or $(CARGO_TARGET_DIR),target)/release
ENSURE_BINS := build
else
BIN_DIR := $(CDC_BIN_DIR)
ENSURE_BINS :=
endif

COUNT ?= 1000
RUN := ./run_pipeline.sh

# Throw-away test clusters on ports of their own; these variables override .env (local-db.sh
# reads .env only for variables that are unset).
TEST_DB_ENV = LOCAL_DB_DIR=.local/pg-test DB_PORT=55434 WAREHOUSE_DB_PORT=55433 LOCAL_DB_FAST=1 \
              DB_USER=postgres DB_PASSWORD=postgres
TEST_ENV = CDC_TEST_SOURCE_PORT=55434 CDC_TEST_WAREHOUSE_PORT=55433

# Benchmark clusters: ports and a directory of their own, default (durable) settings.
BENCH_DB_ENV = LOCAL_DB_DIR=.local/pg-bench DB_PORT=55634 WAREHOUSE_DB_PORT=55633 \
               DB_USER=postgres DB_PASSWORD=postgres
BENCH_ENV = BENCH_SOURCE_PORT=55634 BENCH_WAREHOUSE_PORT=55633
BENCH_ARGS ?=

.PHONY: help quick-start prereqs start stop status restart loader test test-db-stop test-rapid \
        validate resnapshot logs clean clean-archive prod-start db-up db-down db-status db-reset build fmt lint mutate-burst \
        check-monitoring monitoring-up monitoring-down \
        bench bench-quick bench-debezium bench-db-stop soak

help: ## Show this list of targets
	@echo "Usage: make <target>   (settings: .env / environment, see .env.example)"
	@echo
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "} {printf "  %-16s %s\n", $$1, $$2}'

# ---- Run ------------------------------------------------------------------------------------

quick-start: prereqs $(ENSURE_BINS) ## Fresh machine: check/install prerequisites, create .env, prepare the source (extractor setup), start everything
	@if [ ! -f .env ]; then install -m 600 .env.example .env; echo "created .env from .env.example (owner-only: it holds passwords)"; fi
	$(RUN) db-up
	$(BIN_DIR)/extractor setup
	$(RUN) start

prereqs: ## Check prerequisites: cargo, and PostgreSQL (Docker engine or server binaries; apt as root)
	@[ -n "$(CDC_BIN_DIR)" ] || command -v cargo >/dev/null 2>&1 || { \
	  echo "cargo not found: install Rust (https://rustup.rs), then run 'make quick-start' again" >&2; \
	  exit 1; }
	@have_docker() { command -v docker >/dev/null 2>&1 && timeout 5 docker info >/dev/null 2>&1 \
	    && { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }; }; \
	have_pg() { if [ -n "$${PG_BIN:-}" ]; then [ -x "$$PG_BIN/initdb" ] && [ -x "$$PG_BIN/pg_ctl" ]; \
	    else ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	      { command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; }; fi \
	    && command -v psql >/dev/null 2>&1; }; \
	if have_docker; then echo "prereqs: Docker engine answers: databases via docker compose"; \
	elif have_pg; then echo "prereqs: PostgreSQL server binaries found: local clusters (scripts/local-db.sh)"; \
	elif [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "prereqs: no Docker engine and no PostgreSQL server: installing Debian's postgresql"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
	  have_pg || { echo "prereqs: PostgreSQL still not found after install (set PG_BIN?)" >&2; exit 1; }; \
	else \
	  echo "prereqs: need a Docker engine, or the PostgreSQL server binaries (initdb, pg_ctl, psql):" >&2; \
	  echo "  Debian/Ubuntu: sudo apt-get install -y postgresql" >&2; \
	  echo "  Fedora/RHEL:   sudo dnf install -y postgresql-server" >&2; \
	  echo "  macOS:         brew install postgresql@15" >&2; \
	  echo "  or set PG_BIN to the directory holding initdb and pg_ctl" >&2; \
	  exit 1; \
	fi
	@[ -n "$(CDC_BIN_DIR)" ] || pkg-config --exists openssl 2>/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "prereqs: OpenSSL headers missing (TLS to the databases): installing libssl-dev pkg-config"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y libssl-dev pkg-config; \
	  else \
	    echo "prereqs: the build needs OpenSSL's headers and pkg-config (TLS to the databases):" >&2; \
	    echo "  Debian/Ubuntu: sudo apt-get install -y libssl-dev pkg-config" >&2; \
	    echo "  Fedora/RHEL:   sudo dnf install -y openssl-devel pkgconf" >&2; \
	    echo "  macOS:         brew install openssl@3 pkg-config" >&2; \
	    exit 1; \
	  fi; }

start: ## Start databases and mutator, extractor, scd2-loader in the background
	$(RUN) start

prod-start: ## Like start, with JSON logs at level info
	LOG_FORMAT=json LOG_LEVEL=info $(RUN) start

stop: ## Stop the processes, then the databases (run_pipeline.sh stop --keep-db keeps them)
	$(RUN) stop

restart: ## Restart the processes (databases stay up)
	$(RUN) restart

status: ## Databases, processes and lag (exit 0 when healthy)
	$(RUN) status

loader: ## Apply the pending change-log files now (scd2-loader --once, foreground)
	$(RUN) loader

logs: ## Follow the current logs, text and JSON, and crash output (tail -F: across rotations; logs that do not exist yet are followed once they appear)
	tail -n 50 -F $(foreach p,mutator extractor scd2-loader,$(LOG_DIR)/$(p).log $(LOG_DIR)/$(p).json.log $(LOG_DIR)/$(p).stderr)

validate: $(ENSURE_BINS) ## Check the SCD2 history invariants (scd2-loader verify)
	$(BIN_DIR)/scd2-loader verify

resnapshot: $(ENSURE_BINS) ## Read TABLE (schema.table, or ALL=1 every table) again while capture goes on: history gains what the capture missed
	@test -n "$(TABLE)$(ALL)" || { echo "usage: make resnapshot TABLE=public.orders   (or ALL=1)" >&2; exit 2; }
	$(BIN_DIR)/extractor resnapshot $(if $(ALL),--all,$(TABLE))

mutate-burst: $(ENSURE_BINS) ## Run COUNT operations on the source at once (COUNT=1000)
	$(BIN_DIR)/mutator --count $(COUNT)

clean: ## Stop the pipeline; remove pending change logs, extractor state, logs (rotated ones too) and run/ (keeps processed/ and dead_letter/)
	$(RUN) stop
	find data/cdc_logs -mindepth 1 -maxdepth 1 ! -name .gitkeep ! -name processed ! -name dead_letter -exec rm -rf {} +
	rm -rf data/state run
	rm -f $(LOG_DIR)/*.log $(LOG_DIR)/*.stderr

clean-archive: ## Delete data/cdc_logs/processed/ and dead_letter/, the raw audit trail (needs CONFIRM=1)
	@if [ "$(CONFIRM)" != "1" ]; then \
	  echo "This deletes data/cdc_logs/processed/ (every applied change-log file) and data/cdc_logs/dead_letter/ (quarantined files)."; \
	  echo "Run: make clean-archive CONFIRM=1"; exit 1; fi
	rm -rf data/cdc_logs/processed data/cdc_logs/dead_letter
	@echo "deleted data/cdc_logs/processed and data/cdc_logs/dead_letter"

# ---- Databases ------------------------------------------------------------------------------

db-up: ## Start the databases only (docker compose or local clusters)
	$(RUN) db-up

db-down: ## Stop the databases only
	$(RUN) db-down

db-status: ## Are the databases answering?
	$(RUN) db-status

monitoring-up: ## Prometheus (127.0.0.1:9090) and Grafana (127.0.0.1:3000) via docker compose --profile monitoring
	docker compose --profile monitoring up -d prometheus grafana

monitoring-down: ## Stop Prometheus and Grafana (their data stays in compose volumes)
	docker compose --profile monitoring stop prometheus grafana

db-reset: ## Destroy the local clusters (and the change logs and state that refer to them)
	$(RUN) stop --keep-db
	scripts/local-db.sh reset
	find data/cdc_logs -mindepth 1 -maxdepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf data/state run

# ---- Build and test -------------------------------------------------------------------------

build: ## Build the release binaries
	cargo build --release --bins

fmt: ## Format the code (cargo fmt)
	cargo fmt --all

lint: ## rustfmt check and clippy with -D warnings
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings

test: ## Whole test suite against throw-away clusters on ports 55433/55434 (stopped afterwards)
	@command -v cargo-nextest >/dev/null 2>&1 || cargo nextest --version >/dev/null 2>&1 || { \
	  echo "cargo-nextest not found: cargo install cargo-nextest --locked" >&2; exit 1; }
	$(TEST_DB_ENV) scripts/local-db.sh start
	cargo build --workspace --bins
	status=0; $(TEST_ENV) cargo nextest run --workspace || status=$$?; \
	  $(TEST_DB_ENV) scripts/local-db.sh stop >/dev/null || true; exit $$status

check-monitoring: ## Parse and cross-check the monitoring profile (compose, Prometheus, Grafana; needs PyYAML)
	@python3 -c 'import yaml' 2>/dev/null || { echo "check-monitoring needs PyYAML: python3 -m pip install PyYAML" >&2; exit 1; }
	python3 scripts/check-monitoring.py

test-db-stop: ## Stop the test clusters started by make test
	$(TEST_DB_ENV) scripts/local-db.sh stop

test-rapid: ## Unit tests only, no database (cargo nextest --lib --bins)
	cargo nextest run --workspace --lib --bins

# ---- Benchmark ------------------------------------------------------------------------------

bench: ## Full benchmark (~25 min; BENCH_ARGS for more flags): table + target/bench/results.json
	$(BENCH_DB_ENV) scripts/local-db.sh start
	cargo build --release --bins
	$(BENCH_ENV) $(or $(CARGO_TARGET_DIR),target)/release/bench $(BENCH_ARGS)

bench-quick: ## About three minutes: 10,000 operations, 1 run, 15 s steady phases, no 10x memory run
	$(BENCH_DB_ENV) scripts/local-db.sh start
	cargo build --release --bins
	$(BENCH_ENV) $(or $(CARGO_TARGET_DIR),target)/release/bench --ops 10000 --runs 1 \
	  --steady-seconds 15 --rss-factor 0 --rounds 3 --round-rows 10000 --growth-rows 100000 $(BENCH_ARGS)

bench-debezium: ## Logical capture vs Debezium's embedded engine: backlog drain and steady phases (~15 min; Java 17, pip; 200 MB of jars into .local/debezium): target/bench/debezium.json
	$(BENCH_DB_ENV) scripts/local-db.sh start
	cargo build --release --bins
	dir="$$(scripts/debezium.sh build)" && $(BENCH_ENV) $(or $(CARGO_TARGET_DIR),target)/release/bench \
	  --modes logical --rounds 0 --rss-factor 0 --growth-rows 0 \
	  --debezium "$$dir" --out target/bench/debezium.json $(BENCH_ARGS)

bench-db-stop: ## Stop the benchmark's clusters (ports 55633/55634)
	$(BENCH_DB_ENV) scripts/local-db.sh stop

# ---- Soak -----------------------------------------------------------------------------------

soak: ## 3-minute warehouse then source outage under traffic, per capture mode (~8 min each; SOAK_MODE=timestamp|logical|both), verify after; own clusters
	scripts/soak.sh $(or $(SOAK_MODE),both)
