# runvm: see README.md. Every target does the set-up it needs, once.
PREFIX    ?= /opt/runvm
GUEST_DIR ?= /var/lib/runvm/guest
CARGO     ?= cargo
RUNVM     := ./target/debug/runvm

.PHONY: all setup build guest run test lint fmt clean bench fuzz fuzz-smoke

all: build

## Host packages (qemu-system-x86, ...) and the helpers virtiofsd and vhost-device-vsock.
setup:
	@RUNVM_PREFIX=$(PREFIX) bash scripts/setup.sh

## The workspace (debug build).
build: setup
	@echo "==> building the workspace"
	$(CARGO) build --workspace

## The guest image in $(GUEST_DIR): runvm's kernel (built once per machine, cached in
## $(GUEST_DIR)/cache) and the static agent in an initramfs. GUEST_KERNEL=debian-cloud takes
## Debian's cloud kernel and its modules instead.
GUEST_KERNEL ?= runvm
guest: setup
	@echo "==> building the guest image in $(GUEST_DIR)"
	$(CARGO) xtask guest --out $(GUEST_DIR) --kernel $(GUEST_KERNEL)

DEMO      := target/demo

## runvm's main job: check the host, boot a sandbox and report, then run a busybox container
## in a VM and print its output.
run: build guest
	@echo "==> runvm check"
	$(RUNVM) check
	@echo "==> runvm boot: a sandbox VM, its agent, its timings"
	$(RUNVM) boot
	@echo "==> runvm run: a busybox container in its own VM"
	@rm -rf $(DEMO) && $(CARGO) xtask bundle --out $(DEMO)/bundle -- \
		sh -c 'echo "hello from busybox, running in a runvm VM"; uname -sr; hostname'
	$(RUNVM) run --bundle $(DEMO)/bundle runvm-demo

## Format, lint and all tests (unit and integration, real VMs included).
test: build guest lint
	@echo "==> running the tests"
	$(CARGO) test --workspace
	@$(MAKE) --no-print-directory fuzz-smoke

FUZZ_SECS       ?= 30
FUZZ_SMOKE_SECS ?= 8

## Coverage-guided fuzzing of the parsers at runvm's trust boundaries (docs/fuzzing.md): builds
## the targets (libFuzzer, stable toolchain) and runs each for FUZZ_SECS seconds, one at a time;
## prints each target's executions and crashes. `fuzz/run.sh` does more (one target, seeds,
## corpus minimisation).
fuzz:
	@bash fuzz/run.sh build
	@bash fuzz/run.sh run $(FUZZ_SECS)

## Every fuzz target briefly, over the kept corpus (CI, after the tests).
fuzz-smoke:
	@bash fuzz/run.sh build
	@bash fuzz/run.sh run $(FUZZ_SMOKE_SECS)

BENCH_K     ?= 5
BENCH_N     ?= 10
BENCH_FLAGS ?=
## The guest kernels `make bench` measures: runvm's (the guest image of `make guest`) and, with
## debian-cloud, Debian's cloud kernel from an image in GUEST_CLOUD_DIR.
BENCH_KERNELS  ?= runvm debian-cloud
GUEST_CLOUD_DIR ?= /var/lib/runvm/guest-cloud

## Benchmarks: runvm against runc and the floor, BENCH_K runs each, BENCH_N pods for density
## (release binaries); a table, target/bench/results.json and results.svg. More flags:
## BENCH_FLAGS="--only cold,exec --idle-secs 5" (see `cargo xtask bench all --help`).
bench: setup guest
	@echo "==> building release binaries"
	$(CARGO) build --release -p runvm -p runvm-shim
	@echo "==> benchmarks"
	$(CARGO) xtask bench all --bin-dir target/release -k $(BENCH_K) -n $(BENCH_N) $(BENCH_FLAGS)
	@if echo "$(BENCH_KERNELS)" | grep -qw debian-cloud; then \
		echo "==> the guest image with Debian's cloud kernel in $(GUEST_CLOUD_DIR)"; \
		$(CARGO) xtask guest --out $(GUEST_CLOUD_DIR) --kernel debian-cloud && \
		echo "==> benchmarks with Debian's cloud kernel" && \
		$(CARGO) xtask bench all --bin-dir target/release -k $(BENCH_K) -n $(BENCH_N) \
			--guest-dir $(GUEST_CLOUD_DIR) --out-dir target/bench/debian-cloud $(BENCH_FLAGS); \
	fi

lint:
	@echo "==> checking format and lints"
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
