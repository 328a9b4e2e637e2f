# Thin wrapper over CMake/ctest. `make run` and `make test` are the two commands of the
# README: each installs what is missing (Debian packages), builds, then runs.
BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
JOBS       ?= $(shell nproc)
CONFIG     ?= $(wildcard config.yaml)
FUZZ_SECONDS ?= 60

.PHONY: all deps deps-build check-deps build run test test-unit test-asan fuzz bench clean

all: build

# Packages: the build/test/bench sets of scripts/install-deps.sh; building and running
# need the first only.
deps-build:
	./scripts/install-deps.sh build

deps:
	./scripts/install-deps.sh build test

# Every program a test, benchmark or script runs comes from a listed package.
check-deps:
	./scripts/install-deps.sh all
	/usr/bin/python3 scripts/check-deps.py

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo

build: deps-build $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j$(JOBS)

run: build
	./$(BUILD)/portmux-server $(if $(CONFIG),--config $(CONFIG))

# Test files use their own ephemeral ports, so ctest runs several at once.
CTEST_JOBS ?= 4

test: deps build
	cd $(BUILD) && ctest --output-on-failure --timeout 900 -j$(CTEST_JOBS)

test-unit: build
	cd $(BUILD) && ctest --output-on-failure -R '^(unit|fuzzreplay)\.'

test-asan: deps
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DPORTMUX_SANITIZE=ON
	cmake --build $(ASAN_BUILD) -j$(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PORTMUX_SANITIZED=1 \
	  ctest --output-on-failure --timeout 900 -j$(CTEST_JOBS)

fuzz: deps
	./scripts/fuzz.sh $(FUZZ_BUILD) $(FUZZ_SECONDS)

bench: build
	./bench/run.sh

# Binaries, man pages, bash completion, systemd units and the config example under
# $(PREFIX) (DESTDIR works as usual).
PREFIX ?= /usr/local

.PHONY: install package
install: build
	cmake --install $(BUILD) --prefix $(PREFIX)

# A Debian package (CPack): $(BUILD)/portmux_VERSION_ARCH.deb, installing under /usr with
# a postinst that creates the portmux system user.
package: build
	cd $(BUILD) && cpack -G DEB

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD)
