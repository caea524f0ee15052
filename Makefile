# Makefile: a thin wrapper over CMake for the common jobs.
#   make run    install what it needs, build build/ (gcc, RelWithDebInfo), make a sample image, serve data/ with qcowd
#   make test   install what it needs, then: gcc -Werror build, clang ASan+UBSan build + all tests,
#               clang TSan build + the "tsan" tests
#   make bench  the convert benchmark at 1024 MiB on the build/ tree
#   make clean  remove the build trees (distclean: also data/sample.qcow2)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.NOTPARALLEL:
.DELETE_ON_ERROR:

JOBS ?= 2
CMAKE ?= cmake
CTEST ?= ctest
QEMU_IMG ?= qemu-img
QEMU_IO ?= qemu-io
BENCH_MIB ?= 1024

BUILD := build
QCOWIMG := $(BUILD)/tools/qcowimg/qcowimg
QCOWD := $(BUILD)/qcowd/qcowd
LISTEN ?= 127.0.0.1:8080
SAMPLE := data/sample.qcow2

# Sanitizer builds keep assertions on (RelWithDebInfo would add -DNDEBUG).
SAN_TYPE := -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="-g -O1"
export ASAN_OPTIONS := detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS := print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS := halt_on_error=1:second_deadlock_stack=1

# $(call timed,TARGET): run a sub-make target and print how long it took.
timed = @s=$$(date +%s); $(MAKE) --no-print-directory $(1); echo "==> $(1): $$(( $$(date +%s) - s ))s"

.PHONY: help run build sample test test-deps test-werror test-asan test-tsan bench clean distclean

help:
	@sed -n '2,6s/^# \{0,1\}//p' Makefile

## make run ------------------------------------------------------------------
# Serves data/ in the foreground until Ctrl-C (qcowd exits 0 on SIGINT/SIGTERM).
run: build sample
	$(QCOWIMG) info $(SAMPLE)
	@echo "==> qcowd serves data/ on http://$(LISTEN)/ until Ctrl-C; open that URL for the dashboard, or try:"
	@echo "    curl -s http://$(LISTEN)/v1/images/sample"
	@echo "    curl -s -r 0-15 http://$(LISTEN)/v1/images/sample/data | od -A d -t x1"
	@echo "    curl -s 'http://$(LISTEN)/v1/images/sample/extents?context=zero'"
	exec $(QCOWD) --listen $(LISTEN) --catalog data

build:
	bash scripts/install-deps.sh --run
	$(CMAKE) -S . -B $(BUILD) -DCMAKE_C_COMPILER=gcc -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_TESTING=OFF
	$(CMAKE) --build $(BUILD) -j$(JOBS)

# 64 MiB with data patterns, a zero range, one compressed cluster and one internal
# snapshot taken before the first cluster is overwritten. Built under a temporary
# name so a failed step leaves no half-made sample behind.
sample: $(SAMPLE)
$(SAMPLE):
	mkdir -p $(dir $@)
	rm -f $@.tmp
	$(QEMU_IMG) create -q -f qcow2 $@.tmp 64M
	$(QEMU_IO) -f qcow2 \
	    -c 'write -q -P 0xaa 0 1M' \
	    -c 'write -q -P 0x55 4M 192k' \
	    -c 'write -q -c -P 0x11 8M 64k' \
	    -c 'write -q -z 12M 1M' \
	    -c 'write -q -P 0x77 63M 64k' $@.tmp
	$(QEMU_IMG) snapshot -c before-update $@.tmp
	$(QEMU_IO) -f qcow2 -c 'write -q -P 0xbb 0 64k' $@.tmp
	mv $@.tmp $@

## make test -----------------------------------------------------------------
test:
	$(call timed,test-deps)
	$(call timed,test-werror)
	$(call timed,test-asan)
	$(call timed,test-tsan)
	@echo "==> make test: all stages passed"

test-deps:
	bash scripts/install-deps.sh --test

# Warnings gate: gcc, -Werror, everything built (tests too), nothing run.
test-werror:
	$(CMAKE) -S . -B build-gcc -DCMAKE_C_COMPILER=gcc -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOWD_WERROR=ON
	$(CMAKE) --build build-gcc -j$(JOBS)

# ASan + UBSan with clang, the fuzz targets, every test.
test-asan:
	$(CMAKE) -S . -B build-asan -DCMAKE_C_COMPILER=clang $(SAN_TYPE) \
	    -DQCOWD_SANITIZE=address -DQCOWD_FUZZ=ON -DQCOWD_WERROR=ON
	$(CMAKE) --build build-asan -j$(JOBS)
	$(CTEST) --test-dir build-asan --output-on-failure -j$(JOBS)

# TSan with clang: the threaded tests, which carry the label "tsan".
test-tsan:
	$(CMAKE) -S . -B build-tsan -DCMAKE_C_COMPILER=clang $(SAN_TYPE) \
	    -DQCOWD_SANITIZE=thread -DQCOWD_WERROR=ON
	$(CMAKE) --build build-tsan -j$(JOBS)
	@n=$$($(CTEST) --test-dir build-tsan -N -L tsan | sed -n 's/^Total Tests: *//p'); \
	if [ "$${n:-0}" -eq 0 ]; then \
	    echo "test-tsan: no test carries the label \"tsan\" yet: nothing to run under TSan"; \
	else \
	    echo "$(CTEST) --test-dir build-tsan --output-on-failure -j$(JOBS) -L tsan"; \
	    $(CTEST) --test-dir build-tsan --output-on-failure -j$(JOBS) -L tsan; \
	fi

## make bench ----------------------------------------------------------------
bench: build
	QCOWIMG=$(QCOWIMG) QEMU_IMG=$(QEMU_IMG) bash tests/bench/bench_convert.sh $(BENCH_MIB)

clean:
	rm -rf $(BUILD) build-gcc build-asan build-tsan

distclean: clean
	rm -f $(SAMPLE) $(SAMPLE).tmp
