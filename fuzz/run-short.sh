#!/usr/bin/env bash
# Short fuzzing pass for CI: each target for SECONDS_PER_TARGET (default 5 s,
# 20 s in all), starting from the committed seeds in corpus/<target>/. New
# inputs go to a scratch directory, so the tree stays clean. Needs
# cargo-fuzz (`cargo install cargo-fuzz --locked`); on a stable toolchain
# RUSTC_BOOTSTRAP=1 unlocks the nightly flags cargo-fuzz passes (-Z
# sanitizer=address). Exits non-zero on the first crash or build failure
# (a crash's reproducer is in fuzz/artifacts/<target>/).
set -euo pipefail
cd "$(dirname "$0")"
secs="${SECONDS_PER_TARGET:-5}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export RUSTC_BOOTSTRAP=1
for target in proto_decode uevent_parse kmsg_record vmclock_read; do
    mkdir -p "$scratch/$target"
    echo "== fuzz $target for ${secs}s"
    log="$scratch/$target.log"
    if ! cargo fuzz run -O "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$secs" -print_final_stats=1 > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz $target: failed (a crash leaves its input in fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    grep -E "^Done [0-9]+ runs" "$log"
done
echo "fuzz: 4 passed, 0 failed"
