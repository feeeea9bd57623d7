#!/usr/bin/env bash
# Builds runvm's fuzz targets with libFuzzer on the stable toolchain and runs each in turn.
#
#   fuzz/run.sh build                  build every target (release, sanitizer coverage)
#   fuzz/run.sh run SECS [TARGET...]   run each target (all by default) for SECS seconds
#   fuzz/run.sh seeds [TARGET...]      add the seed inputs (fuzz/src/seeds.rs) that add coverage
#                                      to the kept corpus
#   fuzz/run.sh min [TARGET...]        adds to the kept corpus the fewest inputs the last runs
#                                      found (target/fuzz-work) that cover edges it does not
#
# One libFuzzer process at a time (the machine is shared). New inputs go to a scratch corpus
# (target/fuzz-work, not kept); the kept corpus in fuzz/corpus/ is only read. A crash stops its
# target and leaves the input in fuzz/artifacts/TARGET/. Prints, per target, the executions
# and crashes, then exits non-zero if any target crashed. FUZZ_FLAGS adds libFuzzer flags.
set -euo pipefail
cd "$(dirname "$0")"
FUZZ_DIR=$PWD
TARGETS=(ids bundle config state qmp agent_reply agent_service)
TRIPLE=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$FUZZ_DIR/target}
BIN_DIR=$CARGO_TARGET_DIR/$TRIPLE/release
WORK=$CARGO_TARGET_DIR/fuzz-work

# cargo-fuzz's flags, all stable: SanitizerCoverage's module pass with inline 8-bit counters,
# the PC table and compare tracing (libFuzzer's feedback), plus `--cfg fuzzing`. `--target` keeps
# them off build scripts and proc macros.
build() {
    local flags=(
        -Cpasses=sancov-module
        -Cllvm-args=-sanitizer-coverage-level=4
        -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
        -Cllvm-args=-sanitizer-coverage-pc-table
        -Cllvm-args=-sanitizer-coverage-trace-compares
        -Cllvm-args=-sanitizer-coverage-stack-depth
        --cfg fuzzing
    )
    echo "==> building the fuzz targets"
    env -u CARGO_ENCODED_RUSTFLAGS RUSTFLAGS="${flags[*]}" CARGO_INCREMENTAL=0 \
        cargo build --release --target "$TRIPLE" --bins
}

run() {
    local secs=$1
    shift
    local targets=("$@")
    [ ${#targets[@]} -gt 0 ] || targets=("${TARGETS[@]}")
    local failed=0 summary=()
    for t in "${targets[@]}"; do
        mkdir -p "$WORK/$t" "artifacts/$t" "corpus/$t"
        local log=$WORK/$t.log
        echo "==> fuzzing $t for ${secs}s"
        local rc=0
        # shellcheck disable=SC2086
        nice -n "${FUZZ_NICE:-19}" "$BIN_DIR/$t" -max_total_time="$secs" -print_final_stats=1 -timeout=10 \
            -rss_limit_mb=2048 -max_len=65536 -artifact_prefix="artifacts/$t/" \
            ${FUZZ_FLAGS:-} "$WORK/$t" "corpus/$t" >"$log" 2>&1 || rc=$?
        local execs crashes=0
        execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
        if [ "$rc" -ne 0 ]; then
            crashes=1
            failed=1
            grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -5 || true
        fi
        summary+=("$(printf '%-14s %12s execs  %d crashes' "$t" "${execs:-?}" "$crashes")")
    done
    echo "==> fuzz summary (${secs}s per target)"
    printf '%s\n' "${summary[@]}"
    return $failed
}

# Keeps the kept corpus's inputs and adds the fewest of the scratch corpus's that cover the
# edges they do not (a set cover, over edges only: hit counts aside, so the corpus stays small).
minimise() {
    local t=$1
    mkdir -p "corpus/$t"
    nice -n "${FUZZ_NICE:-19}" "$BIN_DIR/$t" -set_cover_merge=1 -use_counters=0 -max_len=65536 \
        "corpus/$t" "$WORK/$t" 2>&1 | grep -E 'MERGE-OUTER: [0-9]+ new files' || true
}

seeds() {
    local targets=("$@")
    [ ${#targets[@]} -gt 0 ] || targets=("${TARGETS[@]}")
    for t in "${targets[@]}"; do
        rm -rf "$WORK/seeds/$t" && mkdir -p "corpus/$t"
        RUNVM_FUZZ_SEEDS=$WORK/seeds "$BIN_DIR/$t"
        "$BIN_DIR/$t" -merge=1 -max_len=65536 "corpus/$t" "$WORK/seeds/$t" 2>&1 | grep -E 'MERGE-OUTER: [0-9]+ new files' || true
    done
}

case "${1:-}" in
build) build ;;
run) shift; run "$@" ;;
seeds) shift; seeds "$@" ;;
min)
    shift
    ts=("$@")
    [ ${#ts[@]} -gt 0 ] || ts=("${TARGETS[@]}")
    for t in "${ts[@]}"; do minimise "$t"; done
    ;;
*) echo "usage: fuzz/run.sh build | run SECS [TARGET...] | seeds [TARGET...] | min [TARGET...]" >&2; exit 2 ;;
esac
