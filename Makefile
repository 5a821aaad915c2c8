# flanneld-py: `make` prints this help.
PY      ?= python3
VENV    ?= .venv
VPY      = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help setup install demo test test-unit lint bench clean asan

help:
	@echo "flanneld-py make targets:"
	@echo "  make demo     install everything, then run a 2-host Docker overlay demo on this machine (root)"
	@echo "  make test     install everything, then run all tests (unit, etcd, netns, docker; root)"
	@echo "  make test-unit  only the tests that need no root and no etcd"
	@echo "  make bench    iperf3 across namespaces: flanneld-py vs kernel VXLAN / routing (root)"
	@echo "  make lint     ruff + mypy"
	@echo "  make install  (re)install the package into $(VENV) (builds the C engine)"
	@echo "  make clean    remove build products and the virtualenv"

setup:
	bash scripts/setup.sh

install:
	bash scripts/setup.sh --no-apt

demo: setup
	$(VPY) -m lab.demo

test: setup
	FLANNELD_TEST_REQUIRE_ALL=1 $(VPY) -m pytest $(PYTEST_ARGS)

test-unit:
	$(VPY) -m pytest -m "unit" $(PYTEST_ARGS)

lint:
	$(VPY) -m ruff check flanneld_py tests lab bench
	$(VPY) -m ruff format --check flanneld_py tests lab bench
	$(VPY) -m mypy

bench: setup
	$(VPY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf build $(VENV) *.egg-info flanneld_py/*.so
