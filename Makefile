# Graylane: two commands on a fresh machine.
#   make demo   runs the main job: a full-link release through the chain a..e, then unattended
#               releases judged on live metrics, then two clusters with one agent each, then
#               proxyless gRPC clients (Python and Node) with no Envoy
#   make test   runs the whole suite
# Each creates .venv and installs what it needs (etcd-server, nodejs and npm through apt-get
# when missing; @grpc/grpc-js-xds from the npm registry into .venv/node; the bench's Node fleet
# into bench/fleet_node/node_modules; the bench's C fleet built with gcc against Debian's
# libnghttp2-dev, installed through apt-get when missing).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-dashboard test chaos bench protos lint typecheck etcd prometheus node fleet-node fleet-c ui browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# xds-protos ships an old copy of opentelemetry/proto/ (Envoy's API imports it); whichever
	# package pip installs last owns those files. Put opentelemetry-proto's own back on top:
	# it is a superset, and the OTLP exporter needs its newer messages.
	$(BIN)/pip install --quiet --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

# etcd 3.4 from Debian: the embedded default of `graylane serve` and the tests' real etcd.
etcd:
	@command -v etcd >/dev/null 2>&1 || { \
	  echo "installing etcd-server (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null; }
	@etcd --version | head -1

# Prometheus from Debian: the tests' real Prometheus for `serve --prometheus-url`.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing prometheus (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# Node and @grpc/grpc-js-xds: the second proxyless gRPC client of the tests and the demo
# (Debian's nodejs and npm through apt-get when missing; the packages from the npm registry,
# pinned by deploy/demo/package-lock.json, into .venv/node).
NODE_DIR   := $(VENV)/node
NODE_STAMP := $(NODE_DIR)/.installed

$(NODE_STAMP): deploy/demo/package.json deploy/demo/package-lock.json
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { \
	  echo "installing nodejs and npm (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	mkdir -p $(NODE_DIR)
	cp deploy/demo/package.json deploy/demo/package-lock.json $(NODE_DIR)/
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node: $(NODE_STAMP)

# The scale bench's fake ADS clients in Node (bench/fleet_node/worker.js): @grpc/grpc-js and
# protobufjs, pinned by its package-lock.json, into bench/fleet_node/node_modules (gitignored);
# Debian's nodejs and npm through apt-get when missing. `make test` needs it for the Node
# fleet's test, `make bench` for `bench/run.py --fleet-impl node`.
FLEET_NODE       := bench/fleet_node
FLEET_NODE_STAMP := $(FLEET_NODE)/node_modules/.installed

$(FLEET_NODE_STAMP): $(FLEET_NODE)/package.json $(FLEET_NODE)/package-lock.json
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { \
	  echo "installing nodejs and npm (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	cd $(FLEET_NODE) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

fleet-node: $(FLEET_NODE_STAMP)

# The scale bench's fake ADS clients in C (bench/fleet_c/worker.c, `--fleet-impl c`): gcc and
# Debian's libnghttp2-dev (apt-get when its header is missing) into bench/fleet_c/graylane-fleet-c
# (gitignored). `make test` needs it for the fleet's test, `make bench` for the fleet (the
# default --fleet-impl).
FLEET_C     := bench/fleet_c
FLEET_C_BIN := $(FLEET_C)/graylane-fleet-c

$(FLEET_C_BIN): $(FLEET_C)/worker.c
	@test -f /usr/include/nghttp2/nghttp2.h || { \
	  echo "installing libnghttp2-dev (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnghttp2-dev >/dev/null; }
	gcc -O2 -Wall -Wextra -Werror -o $@ $< -lnghttp2

fleet-c: $(FLEET_C_BIN)

# The dashboard's chart library (uPlot) from the npm registry into .venv (never committed);
# the control plane serves it under /ui/vendor/.
UPLOT_VERSION := 1.6.32
UIVENDOR := $(VENV)/ui-vendor/node_modules/uplot/dist/uPlot.esm.js
ui: $(UIVENDOR)
$(UIVENDOR):
	@command -v npm >/dev/null 2>&1 || { \
	  echo "installing npm (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }
	mkdir -p $(VENV)/ui-vendor
	npm install --silent --no-audit --no-fund --prefix $(VENV)/ui-vendor uplot@$(UPLOT_VERSION)
	touch $@

# The dashboard's browser tests drive Debian's headless Chromium through chromedriver.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium and chromium-driver (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: $(STAMP) etcd node ui
	$(BIN)/graylane demo
	$(BIN)/graylane demo --unattended
	$(BIN)/graylane demo --clusters 2
	$(BIN)/graylane demo --grpc

# The unattended demo, then its control plane, Envoy and dashboard left up until Ctrl-C.
demo-dashboard: $(STAMP) etcd ui
	$(BIN)/graylane demo --unattended --keep-running

# Two pytest workers (pytest-xdist), each taking whole test files: module fixtures (a two-cluster
# layout, an Envoy) are set up once per file, as in one process.
test: $(STAMP) etcd prometheus node fleet-node fleet-c ui browser
	$(BIN)/python -P protos/generate.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck
	$(BIN)/pytest -q -n 2 --dist loadfile

# The long fault scenarios (etcd quorum loss, replica kill -9 / SIGSTOP, control-plane stalls
# with agents): real processes, each bounded in time; left out of `make test` for its 10 minutes.
chaos: $(STAMP) etcd
	$(BIN)/pytest -q -m chaos --durations=0

bench: $(STAMP) etcd fleet-node fleet-c
	$(BIN)/python -P bench/run.py $(ARGS)

protos: $(STAMP)
	$(BIN)/python -P protos/generate.py

lint: $(STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy --strict over the package as it imports (graylane.controlplane, graylane.xds, ...):
# the folders are mapped to those names by pyproject's package-dir, which mypy cannot
# follow, so it reads them through a tree of symlinks laid out like the package.
TYPEROOT := $(VENV)/typecheck
typecheck: $(STAMP)
	@rm -rf $(TYPEROOT) && mkdir -p $(TYPEROOT)/graylane
	@ln -s $(CURDIR)/protos/graylane/* $(TYPEROOT)/graylane/
	@for d in controlplane agent xds deploy lanes; do ln -s $(CURDIR)/$$d $(TYPEROOT)/graylane/$$d; done
	cd $(TYPEROOT) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
	  --cache-dir $(CURDIR)/.mypy_cache -p graylane

clean:
	rm -rf $(VENV) .graylane $(FLEET_NODE)/node_modules $(FLEET_C_BIN)
