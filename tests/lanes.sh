#!/usr/bin/env bash
# The pytest part of `make test`: the fault-injection cells first, alone (their timing
# bounds want the machine to themselves), then every other folder in two lanes at once,
# one pytest each (most tests wait on processes and servers, not on the CPU).
# Usage: tests/lanes.sh PYTEST [pytest arguments...]
set -uo pipefail
cd "$(dirname "$0")/.."
pytest="$1"
shift

first=(tests/chaos)
lane_a=(tests/process tests/package tests/pipeline tests/fencing tests/isolation tests/observe)
lane_b=(tests/unit tests/runner tests/contract tests/integrations)

# A folder of tests in no lane would never run: refuse rather than skip it.
for dir in tests/*/; do
  dir=${dir%/}
  [ "$dir" = tests/__pycache__ ] && continue
  case " ${first[*]} ${lane_a[*]} ${lane_b[*]} " in
    *" $dir "*) ;;
    *) echo "tests/lanes.sh: $dir is in no lane; add it to one"; exit 2 ;;
  esac
done

"$pytest" "$@" -p no:cacheprovider "${first[@]}"
first_status=$?

log=$(mktemp)
base_a=$(mktemp -d /tmp/ostinato-lane-a-XXXX)
base_b=$(mktemp -d /tmp/ostinato-lane-b-XXXX)
"$pytest" "$@" -p no:cacheprovider --basetemp="$base_a" "${lane_a[@]}" >"$log" 2>&1 &
lane_a_pid=$!
echo "tests/lanes.sh: ${lane_a[*]} run beside this one; their report follows it"
"$pytest" "$@" -p no:cacheprovider --basetemp="$base_b" "${lane_b[@]}"
b_status=$?
wait "$lane_a_pid"
a_status=$?
echo
echo "=============== ${lane_a[*]} ==============="
cat "$log"
rm -rf "$log" "$base_a" "$base_b"

for status in "$first_status" "$a_status" "$b_status"; do
  # 5: no test selected in a lane (a marker left it empty), which is not a failure.
  if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
    echo "tests/lanes.sh: a lane failed (exit statuses: first $first_status, a $a_status, b $b_status)"
    exit 1
  fi
done
