#!/usr/bin/env bash
# fairgate's nightly tier (SCENARIOS.md: tier `nightly`): the long scenarios and the fuzz
# campaigns that `.ci/run` does not run.
#
# What it runs, in order:
#   1. every nightly test target of `fairgate-tests` (`nightly_*.rs`, built only with
#      `--features nightly`), one test at a time (`--test-threads=1`: they load the machine),
#      against a debug `fairgate` built first (the harness runs target/debug/fairgate);
#   2. a fuzz campaign of FUZZ_SECONDS (default 600) for every target in fuzz/fuzz_targets/:
#      `cargo fuzz run <target> -- -max_total_time=… -timeout=1 -rss_limit_mb=512`
#      (cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 lets the default stable
#      toolchain build them). The checked-in corpus fuzz/corpus/<target>/ seeds each run and
#      is never modified; new inputs land in target/nightly-fuzz/corpus/<target>/ (copy the
#      interesting ones into fuzz/corpus by hand), crashes in fuzz/artifacts/<target>/.
#
# What it installs when missing: cargo-fuzz (`cargo install cargo-fuzz --locked`) and the
# Debian packages the scenarios use (faketime, redis-server, nginx-light, haproxy, wrk),
# with service start-up suppressed (a policy-rc.d that exits 101) so nothing listens on a
# public port. Installing needs root; without it the script says what is missing and the
# scenarios that need it fail with that message.
#
# Usage: scripts/nightly.sh [--tests-only | --fuzz-only]
# Environment: FUZZ_SECONDS (default 600), FUZZ_TARGETS (space-separated; default: all),
# NIGHTLY_TEST_FILTER (a test-name filter), NIGHTLY_NO_INSTALL=1 (install nothing).
# Exit status: 0 when every step passed; otherwise 1, after running every step, with a
# summary of the failed steps. Expect about 15 min of tests plus 10 min per fuzz target.
set -uo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-600}"
mode="${1:-all}"
failed=()

step() { echo; echo "== $*"; }

install_packages() {
    local missing=()
    command -v faketime >/dev/null || missing+=(faketime)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v nginx >/dev/null || missing+=(nginx-light)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages (need root to install): ${missing[*]}"
        return 0
    fi
    step "installing ${missing[*]}"
    # Debian would start nginx/haproxy/redis on install: forbid service start-up.
    local rc=/usr/sbin/policy-rc.d had_rc=0
    [ -e "$rc" ] && had_rc=1
    [ $had_rc -eq 0 ] && { printf '#!/bin/sh\nexit 101\n' >"$rc"; chmod +x "$rc"; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    local status=$?
    [ $had_rc -eq 0 ] && rm -f "$rc"
    return $status
}

run_tests() {
    step "build the fairgate binary the harness runs"
    cargo build -p fairgate-gateway || { failed+=("build fairgate"); return; }
    local targets
    targets=$(ls tests/tests/nightly_*.rs 2>/dev/null | xargs -n1 basename | sed 's/\.rs$//')
    for t in $targets; do
        step "cargo test -p fairgate-tests --features nightly --test $t"
        cargo test -p fairgate-tests --features nightly --test "$t" -- \
            --test-threads=1 ${NIGHTLY_TEST_FILTER:-} || failed+=("test $t")
    done
}

run_fuzz() {
    if ! cargo fuzz --version >/dev/null 2>&1; then
        step "cargo install cargo-fuzz"
        cargo install cargo-fuzz --locked || { failed+=("install cargo-fuzz"); return; }
    fi
    local targets="${FUZZ_TARGETS:-}"
    [ -n "$targets" ] || targets=$(ls fuzz/fuzz_targets/*.rs | xargs -n1 basename | sed 's/\.rs$//')
    for target in $targets; do
        # New inputs go to a work corpus under target/, seeded from the checked-in one, so a
        # campaign never rewrites fuzz/corpus (whose files replay in the normal test run).
        local work="$PWD/target/nightly-fuzz/corpus/$target"
        mkdir -p "$work"
        step "fuzz $target for ${FUZZ_SECONDS}s (new inputs: $work)"
        RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$work" "$PWD/fuzz/corpus/$target" -- \
            -max_total_time="$FUZZ_SECONDS" -timeout=1 -rss_limit_mb=512 \
            || failed+=("fuzz $target")
    done
}

if [ -z "${NIGHTLY_NO_INSTALL:-}" ]; then
    install_packages || failed+=("install packages")
fi
case "$mode" in
    --tests-only) run_tests ;;
    --fuzz-only) run_fuzz ;;
    all) run_tests; run_fuzz ;;
    *) echo "usage: $0 [--tests-only | --fuzz-only]"; exit 2 ;;
esac

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "nightly: all steps passed"
    exit 0
fi
echo "nightly: FAILED steps:"
printf '  - %s\n' "${failed[@]}"
exit 1
