# ferroloop: one Makefile for people, CI and the README.  `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Interpreters: 3.11 is the machine's own; 3.10, 3.12 and 3.13 are pyenv's builds.
# `make test` runs on all four and fails loudly when one is missing.
pyfor = $(firstword $(wildcard $(HOME)/.pyenv/versions/3.$(1)*/bin/python3.$(1)) $(shell command -v python3.$(1)))
PY311 ?= $(or $(call pyfor,11),$(shell command -v python3))
PY310 ?= $(call pyfor,10)
PY312 ?= $(call pyfor,12)
PY313 ?= $(call pyfor,13)
PYbench ?= $(PY311)
TEST_PYTHONS ?= 311 313 310 312
# The servers and libraries the README names (tests/frameworks/), each in a venv of its own.
FRAMEWORK_PYTHONS ?= 311 313
# Every interpreter those targets exist for (`make test-fw310` and `test-fw312` by hand).
FW_NAMES := 310 311 312 313
PYfw310 ?= $(PY310)
PYfw311 ?= $(PY311)
PYfw312 ?= $(PY312)
PYfw313 ?= $(PY313)

VENV ?= .venv
DEV_DEPS := "maturin>=1.7,<2" "pytest>=8" pytest-timeout ruff mypy

.PHONY: help
help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  %-16s %s\n",$$1,$$2}'

# --- virtualenvs ------------------------------------------------------------
# venv-<name>: a virtualenv for one interpreter, with the dev dependencies.
.venv-%/.ok:
	@py="$(PY$*)"; \
	 test -n "$$py" && test -x "$$py" || { \
	   echo "!!! CPython $(patsubst 3%,3.%,$*) not found (expected pyenv's build under ~/.pyenv/versions/)."; \
	   echo "!!! install it with 'pyenv install $(patsubst 3%,3.%,$*)' and run again."; exit 1; }; \
	 echo "--- virtualenv .venv-$* with $$py"; \
	 $$py -m venv .venv-$*; \
	 .venv-$*/bin/pip install -q --disable-pip-version-check -U pip; \
	 .venv-$*/bin/pip install -q --disable-pip-version-check $(DEV_DEPS) \
	   $(if $(filter bench,$*),-r bench/requirements.txt) \
	   $(if $(filter fw%,$*),-r tests/frameworks/requirements.txt)
	@touch $@

.PRECIOUS: .venv-%/.ok
# A framework venv made before the pins changed installs them again.
$(patsubst %,.venv-fw%/.ok,$(FW_NAMES)): tests/frameworks/requirements.txt

# --- builds -----------------------------------------------------------------
# develop-<name>: build the extension into that venv for the tests: optimised, but with debug
# assertions and overflow checks on and without LTO (faster to build). Each interpreter gets
# its own target dir so the builds do not evict each other.
TEST_BUILD_ENV := CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true \
	CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
develop-%: .venv-%/.ok
	@echo "--- build ferroloop (test build) for .venv-$*"
	$(TEST_BUILD_ENV) CARGO_TARGET_DIR=target/test$* VIRTUAL_ENV=$(CURDIR)/.venv-$* \
	  PATH=$(CURDIR)/.venv-$*/bin:$$PATH .venv-$*/bin/maturin develop --release -q

# develop-fw<name>: the framework venv imports the build that develop-<name> made (a .pth to
# python/, as maturin develop writes), so nothing is built twice. Static pattern rules: as
# implicit ones, `develop-%` (stem fw311) could win whenever .venv-fw311/.ok exists.
$(patsubst %,develop-fw%,$(FW_NAMES)): develop-fw%: develop-% .venv-fw%/.ok
	.venv-fw$*/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
	  | xargs -I{} cp .venv-$*/lib/python3.$(patsubst 3%,%,$*)/site-packages/ferroloop.pth {}/

# The benchmark build: full release profile (fat LTO), installed as a wheel into its own venv.
.PHONY: build-bench
build-bench: .venv-bench/.ok
	@echo "--- build ferroloop (release) for the benchmarks"
	rm -rf target/wheels-bench
	CARGO_TARGET_DIR=target/bench .venv-bench/bin/maturin build --release -q \
	  -i .venv-bench/bin/python -o target/wheels-bench
	.venv-bench/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps \
	  target/wheels-bench/ferroloop-*.whl

# --- the two README commands -------------------------------------------------
.PHONY: bench
bench: build-bench  ## build (release), then run the benchmark comparison (quick mode)
	bash bench/install-tools.sh .venv-bench/bin/python
	.venv-bench/bin/python bench/run.py --quick

.PHONY: test
test: lint test-rust $(addprefix test-,$(TEST_PYTHONS)) $(addprefix test-fw,$(FRAMEWORK_PYTHONS))  ## build and run every test (lints, Rust units, pytest and CPython conformance on 3.10-3.13, the frameworks on 3.11/3.13)
	@echo "=== all tests passed"

# --- pieces -----------------------------------------------------------------
.PHONY: lint
lint: .venv-311/.ok  ## cargo fmt --check, clippy -D warnings, ruff, stub check
	cargo fmt --all -- --check
	PYO3_PYTHON=$(CURDIR)/.venv-311/bin/python CARGO_TARGET_DIR=target/lint cargo clippy --all-targets -- -D warnings
	cargo fmt --manifest-path bench/loadgen/Cargo.toml -- --check
	CARGO_TARGET_DIR=bench/loadgen/target cargo clippy --manifest-path bench/loadgen/Cargo.toml --all-targets -- -D warnings
	.venv-311/bin/ruff check python tests bench
	.venv-311/bin/ruff format --check python tests bench

.PHONY: test-rust
test-rust: .venv-311/.ok  ## Rust unit tests (timer heap, ready queue)
	PYO3_PYTHON=$(CURDIR)/.venv-311/bin/python CARGO_TARGET_DIR=target/lint \
	  LD_LIBRARY_PATH=$$(.venv-311/bin/python -c 'import sysconfig;print(sysconfig.get_config_var("LIBDIR"))') \
	  cargo test --lib -q

test-%: develop-%  ## pytest + stub check + CPython conformance on one interpreter (310, 311, 312, 313)
	@echo "=== Python $* : pytest"
	.venv-$*/bin/python -m pytest -q tests
	@echo "=== Python $* : type stubs against the extension"
	.venv-$*/bin/python -m mypy.stubtest ferroloop._ferroloop --allowlist tests/stubtest_allowlist.txt
	@echo "=== Python $* : CPython test_asyncio conformance"
	.venv-$*/bin/python tests/cpython/run_conformance.py

$(patsubst %,test-fw%,$(FW_NAMES)): test-fw%: develop-fw%  ## uvicorn, gunicorn, hypercorn, granian, sanic, aiohttp, pytest-asyncio, anyio's and uvloop's suites on both loops (310-313)
	@echo "=== Python $* : servers and libraries (tests/frameworks)"
	.venv-fw$*/bin/python -m pytest -q -p no:asyncio -p no:anyio tests/frameworks

.PHONY: fmt
fmt:  ## format Rust and Python sources
	cargo fmt --all
	.venv-311/bin/ruff format python tests bench
	.venv-311/bin/ruff check --fix python tests bench

.PHONY: clean
clean:  ## remove build products and virtualenvs
	rm -rf target .venv-* python/ferroloop/*.so bench/loadgen/target
