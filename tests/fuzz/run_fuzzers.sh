#!/usr/bin/env bash
# Usage: tests/fuzz/run_fuzzers.sh [runs] [target...]
#
# Builds the libFuzzer targets (tests/fuzz/CMakeLists.txt: clang, -fsanitize=fuzzer,address,
# undefined) into build-fuzz/ (or $FUZZ_BUILD_DIR) and runs each target for `runs` inputs
# (default 100000), starting from its seeds in tests/fuzz/corpus/<target>/. New inputs the
# fuzzer keeps go to build-fuzz/corpus/<target>/, never into the repository. A finding (a crash,
# an ASan or UBSan report, an exception other than moe::UsageError/RuntimeError, one input
# running past 10 s, an allocation over 2 GB) stops that target and leaves the input in
# build-fuzz/findings/<target>/; replay it with `build-fuzz/<target> FILE`. Prints one summary
# line per target; exits 1 when any target found something.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-100000}
shift || true
build_dir=${FUZZ_BUILD_DIR:-build-fuzz}

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for src in tests/fuzz/fuzz_*.cpp; do targets+=("$(basename "$src" .cpp)"); done
fi

cmake -S tests/fuzz -B "$build_dir" -DCMAKE_CXX_COMPILER="${CLANGXX:-clang++}" > /dev/null
cmake --build "$build_dir" -j "$(nproc)" --target "${targets[@]}"

summary=()
failed=0
for target in "${targets[@]}"; do
  corpus="$build_dir/corpus/$target"
  findings="$build_dir/findings/$target"
  log="$build_dir/logs/$target.log"
  mkdir -p "$corpus" "$findings" "$(dirname "$log")"
  echo "== $target: $runs inputs (log: $log)"
  dict=()  # the format's tokens and hostile values, where the target has a dictionary
  [ -e "tests/fuzz/dict/$target.dict" ] && dict=(-dict="tests/fuzz/dict/$target.dict")
  start=$(date +%s)
  status=0
  "$build_dir/$target" -runs="$runs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$findings/" "${dict[@]}" \
      "$corpus" "tests/fuzz/corpus/$target" > "$log" 2>&1 || status=$?
  seconds=$(( $(date +%s) - start ))
  executed=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  if [ "$status" -eq 0 ]; then
    result="clean"
  else
    failed=1
    result="FINDING (exit $status): $(ls -t "$findings" | head -1) -- see $log"
    grep -m 3 -E 'ERROR: |FUZZ FINDING|runtime error|deadly signal' "$log" || true
  fi
  summary+=("$(printf '%-28s %9s inputs %5ss  %-9s %s' "$target" "${executed:-?}" "$seconds" \
                "${coverage:-}" "$result")")
done

echo
echo "== fuzz summary ($runs inputs asked per target)"
printf '%s\n' "${summary[@]}"
exit $failed
