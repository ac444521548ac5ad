#!/usr/bin/env bash
# libFuzzer on the targets of `shelfsync_tests::fuzz` (see tests/fuzz/README.md). Needs the
# nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#
#   scripts/fuzz.sh smoke [SECS]        every target for SECS seconds (default 30), starting from
#                                       the committed corpus, which it leaves as it is
#   scripts/fuzz.sh run TARGET RUNS     a campaign: RUNS executions, new inputs into the corpus
#   scripts/fuzz.sh cmin TARGET         minimise TARGET's committed corpus
#
# One job at a time (the machine has two shared cores), niced. Builds without a sanitizer: the
# targets are safe Rust, the findings are panics, overflows (debug assertions are on) and the
# targets' own oracles.
set -euo pipefail
cd "$(dirname "$0")/../tests"
TARGETS=(wire agent_session hub_session agent_bodies hub_bodies)
BUILD=(-s none)

dict() {
  [ -f "fuzz/dicts/$1.dict" ] && echo "-dict=fuzz/dicts/$1.dict"
  true
}

case "${1:-}" in
  smoke)
    secs=${2:-30}
    nice cargo +nightly fuzz build "${BUILD[@]}"
    for t in "${TARGETS[@]}"; do
      scratch=$(mktemp -d)
      echo "== fuzz smoke: $t for ${secs}s"
      # New inputs go to the scratch dir (the first one); the committed corpus is only read.
      status=0
      nice cargo +nightly fuzz run "${BUILD[@]}" "$t" "$scratch" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 $(dict "$t") >"$scratch.log" 2>&1 || status=$?
      grep -E "^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)|^Done" "$scratch.log" || true
      rm -rf "$scratch"
      if [ "$status" -ne 0 ]; then
        tail -40 "$scratch.log" >&2
        echo "fuzz smoke: $t failed (exit $status); the input is in tests/fuzz/artifacts/$t/" >&2
        exit 1
      fi
      rm -f "$scratch.log"
    done
    ;;
  run)
    t=$2
    runs=$3
    nice cargo +nightly fuzz build "${BUILD[@]}" "$t"
    mkdir -p "fuzz/corpus/$t"
    nice cargo +nightly fuzz run "${BUILD[@]}" "$t" "fuzz/corpus/$t" -- \
      -runs="$runs" -print_final_stats=1 $(dict "$t")
    ;;
  cmin)
    t=$2
    nice cargo +nightly fuzz cmin "${BUILD[@]}" "$t" "fuzz/corpus/$t"
    ;;
  *)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
