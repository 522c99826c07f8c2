#!/usr/bin/env bash
# The fuzz suite (fuzz/, cargo-fuzz + libFuzzer): builds every target, runs each for a fixed
# time and prints one line per target. Exits non-zero when any target crashed; the crashing
# input is in fuzz/artifacts/<target>/ (replay it with `cargo +nightly fuzz run <target> FILE`).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, every target
#
# Properties: no panic (overflow checks and debug assertions are on), no allocation over
# 512 MB and no RSS over 2 GB (AddressSanitizer's allocator hooks, as libFuzzer needs for
# -malloc_limit_mb), no input slower than 10 s, plus each target's own asserts. One libFuzzer
# job per target, one after the other; cargo builds with FUZZ_JOBS jobs (default 1).
# Corpora grow in fuzz/corpus/<target>/ (ignored by git) from the seeds in fuzz/seeds/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2
  exit 64
fi
shift $(($# > 0 ? 1 : 0))

target_dir=${FUZZ_TARGET_DIR:-$PWD/fuzz/target}
export CARGO_BUILD_JOBS=${FUZZ_JOBS:-1}

# cargo-fuzz needs a nightly toolchain (-Zsanitizer, sancov passes).
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "== installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

all_targets=$(cargo +nightly fuzz list --fuzz-dir fuzz)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets <<<"$all_targets"
fi
for t in "${targets[@]}"; do
  if ! grep -qx "$t" <<<"$all_targets"; then
    echo "unknown target $t; known: $(tr '\n' ' ' <<<"$all_targets")" >&2
    exit 64
  fi
done

# Only config_load needs enrichd-worker (actix, lapin, sea-orm): leave it out when it is not run.
features=()
if ! grep -qx config_load < <(printf '%s\n' "${targets[@]}"); then
  features=(--no-default-features)
fi

echo "== building ${#targets[@]} fuzz target(s) (cargo +nightly fuzz build, $CARGO_BUILD_JOBS job(s))"
cargo +nightly fuzz build --fuzz-dir fuzz --target-dir "$target_dir" "${features[@]}"

logs="$target_dir/fuzz-logs"
mkdir -p "$logs"
summary=()
failed=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  dict=()
  if [ -f "fuzz/dicts/$t.dict" ]; then
    dict=("-dict=fuzz/dicts/$t.dict")
  elif [[ $t == *_wire || $t == bus_decode || $t == feodo_index ]]; then
    dict=("-dict=fuzz/dicts/json.dict")
  fi
  before=$(find "fuzz/artifacts/$t" -type f | wc -l)
  echo "== $t: ${seconds} s"
  status=0
  cargo +nightly fuzz run --fuzz-dir fuzz --target-dir "$target_dir" "${features[@]}" "$t" \
    "fuzz/corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
    -print_final_stats=1 "${dict[@]}" </dev/null >"$logs/$t.log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -1)
  # The last status line's `corp: UNITS/SIZE`: the corpus libFuzzer ends with.
  corpus=$(grep -o 'corp: [0-9]*/[0-9A-Za-z]*' "$logs/$t.log" | tail -1 | cut -d' ' -f2)
  crashes=$(($(find "fuzz/artifacts/$t" -type f | wc -l) - before))
  if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
    crashes=1 # died without writing an artifact (a build or a setup failure): see the log
  fi
  if [ "$crashes" -gt 0 ]; then
    failed=1
    echo "   $t failed (exit $status); log: $logs/$t.log"
    grep -m1 -E '^==[0-9]+== ERROR|panicked at|^SUMMARY' "$logs/$t.log" | sed 's/^/   /' || true
  fi
  summary+=("$(printf '%-16s %6s %12s %9s %14s %8s' "$t" "$seconds" "${execs:-?}" \
    "${rate:-?}" "${corpus:-?}" "$crashes")")
done

echo
printf '%-16s %6s %12s %9s %14s %8s\n' target seconds executions exec/s corpus crashes
printf '%s\n' "${summary[@]}"
exit "$failed"
