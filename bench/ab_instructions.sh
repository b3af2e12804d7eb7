#!/bin/bash
# Instructions per request of gateway commits, side by side (bench/README.md, "Where the
# microseconds go"). For each commit: a git worktree in $WORK, a plain gateway and a cached one
# (memory store) on CPU 1, then in three alternating rounds `perf stat -e instructions:u` around a
# 6 s `wrk -c64` run on CPU 0: plain, cache hit, cache miss (Cache-Control: no-cache).
# Prints "round commit target rps kinstructions/req cpu-us/req". Needs perf (Debian: linux-perf)
# and an HTTP backend serving /hello.json on 127.0.0.1:$BACKEND (e.g. the nginx of a bench run).
# usage: BACKEND=18080 bench/ab_instructions.sh COMMIT...
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd); PYTHON=${PYTHON:-$REPO/.venv/bin/python}
. "$REPO/bench/perf_counts.sh"
SHAS=("$@")
WORK=${WORK:-/tmp/ab}; BACKEND=${BACKEND:-18080}; mkdir -p "$WORK"; cd "$WORK"
port=18200
declare -A PIDS
for sha in "$@"; do
  [ -d $WORK/$sha ] || git -C "$REPO" worktree add -q --detach $WORK/$sha $sha
  for kind in plain hit; do
    port=$((port+1))
    if [ $kind = plain ]; then d="{auth: none, rate_limit: off, cache: off}"; else d="{auth: none, rate_limit: off, cache: {ttl: 1h}}"; fi
    printf 'listen: {host: 127.0.0.1, port: %s}\nadmin: off\ndefaults: %s\nservices:\n  static: {upstreams: ["http://127.0.0.1:%s"]}\n' $port "$d" "$BACKEND" > $WORK/$sha-$kind.yaml
    PYTHONPATH=$WORK/$sha taskset -c 1 $PYTHON -c "import sys; sys.argv=['gateway','run','-c','$WORK/$sha-$kind.yaml']; from gateway.cli import run; run()" > $WORK/$sha-$kind.log 2>&1 &
    PIDS[$sha-$kind]="$! $port"
  done
done
sleep 8  # ten gateways starting on one core
measure() { # pid url header
  perf stat -e instructions:u,task-clock -p $1 -o $WORK/perf.txt -- sleep 7 &
  sp=$!; sleep 0.3
  if [ -n "$3" ]; then out=$(taskset -c 0 wrk -t1 -c64 -d6s -H "$3" "$2"); else out=$(taskset -c 0 wrk -t1 -c64 -d6s "$2"); fi
  wait $sp
  reqs=$(echo "$out" | awk '/requests in/{print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
  iu=$(awk '/instructions:u/{gsub(",","",$1); print $1}' $WORK/perf.txt); tc=$(awk '/task-clock/{gsub(",","",$1); print $1}' $WORK/perf.txt)
  python3 -c "print(f'{$rps:.0f} {$iu/$reqs/1000:.0f} {$tc*1000/$reqs:.0f}')"
}
for round in 1 2 3; do
  for sha in "${SHAS[@]}"; do
    set -- ${PIDS[$sha-plain]}; p=$1; port=$2
    curl -s -o /dev/null http://127.0.0.1:$port/api/static/hello.json
    echo "$round $sha plain $(measure $p http://127.0.0.1:$port/api/static/hello.json '')"
    set -- ${PIDS[$sha-hit]}; p=$1; port=$2
    curl -s -o /dev/null http://127.0.0.1:$port/api/static/hello.json
    echo "$round $sha hit $(measure $p http://127.0.0.1:$port/api/static/hello.json '')"
    echo "$round $sha miss $(measure $p http://127.0.0.1:$port/api/static/hello.json 'Cache-Control: no-cache')"
  done
done
for k in "${!PIDS[@]}"; do set -- ${PIDS[$k]}; kill $1; done
