# vdpad: build, test (host + VM), demo, benchmarks.
# Everything a fresh Debian machine needs is installed by the targets
# themselves (as root): python3-venv/-dev for the virtualenv and the cffi
# build, the VM harness's host tools, the backports kernel.

PYTHON ?= python3
VENV   := $(CURDIR)/.venv
PY     := $(VENV)/bin/python
HARNESS := $(PY) -m tests.vm.harness
PYTEST_VM_ARGS ?=
REPORTS := $(CURDIR)/.vm/reports

.PHONY: all install test host-test vm-test vm-boot-test systemd-test vm-prepare demo bench bench-restart bench-host \
	bench-messages bench-misses bench-service bench-migration bench-deps clean

all: install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py cffi_build/vhost_build.py
	@$(PYTHON) -c 'import ensurepip, sysconfig, os, sys; \
	  sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' 2>/dev/null \
	  && command -v cc >/dev/null \
	  || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	       python3-venv python3-dev gcc; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

host-test: install
	$(PY) -m pytest -m "not kernel and not vm_boot and not systemd" --junitxml=$(REPORTS)/host.xml tests

vm-prepare: install
	$(HARNESS) prepare

# The harness's own tests that boot QEMU, on the host (vm-test runs them first).
vm-boot-test: vm-prepare
	rm -f $(REPORTS)/vm-boot.xml
	$(PY) -m pytest -m vm_boot --junitxml=$(REPORTS)/vm-boot.xml tests/vm

# In the guest, hypothesis's plugin alone costs ~6 s of TCG start-up.
vm-test: vm-prepare vm-boot-test
	rm -f $(REPORTS)/kernel.xml
	$(HARNESS) run --collect $(REPORTS) -- sh -c "$(PY) -m pytest -m kernel \
	  -p no:hypothesispytest -p no:cacheprovider --junitxml=\$$VDPAD_VM_OUT/kernel.xml \
	  $(PYTEST_VM_ARGS) tests/kernel"

# The units under the real systemd (tests/systemd/), in the VM booted with systemd as PID 1.
systemd-test: vm-prepare
	rm -f $(REPORTS)/systemd.xml
	$(HARNESS) run --init systemd --collect $(REPORTS) -- sh -c "$(PY) -m pytest -m systemd \
	  -p no:hypothesispytest -p no:cacheprovider --junitxml=\$$VDPAD_VM_OUT/systemd.xml \
	  $(PYTEST_VM_ARGS) tests/systemd"

test: vm-prepare host-test vm-test systemd-test
	@$(PY) -m tests.report host=$(REPORTS)/host.xml vm-boot=$(REPORTS)/vm-boot.xml kernel=$(REPORTS)/kernel.xml \
	  systemd=$(REPORTS)/systemd.xml

demo: vm-prepare
	$(HARNESS) run -- env VDPAD=$(VENV)/bin/vdpad PYTHON=$(PY) sh tests/vm/guest/demo.sh

# Every benchmark; each writes its figures and plot under docs/bench/ (docs/bench/README.md).
bench: bench-restart bench-messages bench-misses bench-service bench-migration bench-host

bench-deps: install
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[test,bench]'

# Restart time with and without IOTLB_PERSIST (tests/bench/restart.py) in the
# VM, then its plot on the host: docs/bench/restart.json and restart.png.
BENCH_MEMORY ?= 4G
BENCH_ARGS ?=
bench-restart: vm-prepare bench-deps
	$(HARNESS) run --memory $(BENCH_MEMORY) --collect $(CURDIR)/docs/bench -- \
	  $(PY) -m tests.bench.restart $(BENCH_ARGS)
	$(PY) -m tests.bench.plot docs/bench/restart.json docs/bench/restart.png

# What the daemon costs (tests/bench/service.py) in the VM: one-mapping commits
# through it against in-process, round trips, 32 clients for 60 s;
# docs/bench/service.json and service.png.
SERVICE_BENCH_ARGS ?=
bench-service: vm-prepare bench-deps
	$(HARNESS) run --collect $(CURDIR)/docs/bench -- \
	  $(PY) -m tests.bench.service $(SERVICE_BENCH_ARGS)
	$(PY) -m tests.bench.plot_service docs/bench/service.json docs/bench/service.png

# Migration downtime through the daemon (tests/bench/migration.py) in the VM,
# destination mapped early or at the switch-over, VA and PA mode, then its plot
# on the host: docs/bench/migration.json and migration.png.
MIGRATION_BENCH_ARGS ?=
bench-migration: vm-prepare bench-deps
	$(HARNESS) run --memory $(BENCH_MEMORY) --collect $(CURDIR)/docs/bench -- \
	  $(PY) -m tests.bench.migration $(MIGRATION_BENCH_ARGS)
	$(PY) -m tests.bench.plot_migration docs/bench/migration.json docs/bench/migration.png

# The IOTLB engine's own logic per commit (tests/bench/engine.py), host only, no
# VM: docs/bench/engine.json and engine.png.
bench-host: bench-deps
	$(PY) -m tests.bench.engine --out docs/bench
	$(PY) -m tests.bench.plot_engine docs/bench/engine.json docs/bench/engine.png

# What an IOTLB message costs (tests/bench/messages.py) in the VM: vdpad's paths
# against the bare C write loop, and single transactions against the tree
# before the batch path (MESSAGES_BASELINE, unpacked from git into build/);
# docs/bench/messages.json and messages.png.
MESSAGES_BASELINE ?= ae24656
bench-messages: vm-prepare bench-deps
	rm -rf build/baseline && mkdir -p build/baseline
	git archive $(MESSAGES_BASELINE) vdpad | tar -x -C build/baseline
	cp vdpad/_uapi.* build/baseline/vdpad/
	$(HARNESS) run --collect $(CURDIR)/docs/bench -- \
	  $(PY) -m tests.bench.messages --baseline build/baseline $(BENCH_ARGS)
	$(PY) -m tests.bench.plot_messages docs/bench/messages.json docs/bench/messages.png

# How fast a device-IOTLB miss is answered (tests/bench/misses.py) in the VM:
# the daemon (a vhost-net session on a domain) and its MissServer in-process
# against a C loop compiled there with cffi, on vhost-net with a tap;
# docs/bench/misses.json and misses.png.
MISSES_BENCH_ARGS ?=
bench-misses: vm-prepare bench-deps
	$(HARNESS) run --collect $(CURDIR)/docs/bench -- \
	  $(PY) -m tests.bench.misses $(MISSES_BENCH_ARGS)
	$(PY) -m tests.bench.plot_misses docs/bench/misses.json docs/bench/misses.png

clean:
	rm -rf $(VENV) build *.egg-info vdpad/_uapi.*
