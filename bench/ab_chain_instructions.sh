#!/bin/bash
# Instructions per request of gateway commits on the full chain and its parts, every request a new
# URL (bench/README.md, "Where the microseconds go"). The companion of ab_instructions.sh, which
# measures one URL over and over.
#
# For each commit, one at a time: a git worktree in $WORK and one gateway per configuration on
# CPU 1, then in two rounds `perf stat -e instructions:u` around a 4 s `wrk -c64` run on CPU 0 with
# unique_query.lua (a query string never sent before on every request):
#   plain      auth none, no rate limit, no cache
#   memmiss    cache on the memory store (every request a miss: lookup, lock, upstream, store)
#   redismiss  the same cache on Redis
#   redisrl    a never-rejecting rate limit on Redis, no cache
#   auth       HS256 auth required (wrk sends a valid token), nothing else
#   full       all three on Redis: the bench's gateway-full-chain
# Prints "commit round configuration rps kinstructions/req cpu-us/req".
#
# Needs perf (Debian: linux-perf), an HTTP backend serving /hello.json on 127.0.0.1:$BACKEND
# (e.g. nginx with bench's www) and a Redis on 127.0.0.1:$REDIS that may be written to (db 0).
# usage: BACKEND=18080 REDIS=6379 bench/ab_chain_instructions.sh COMMIT...
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd); PYTHON=${PYTHON:-$REPO/.venv/bin/python}
. "$REPO/bench/perf_counts.sh"
WORK=${WORK:-/tmp/ab-chain}; BACKEND=${BACKEND:-18080}; REDIS=${REDIS:-6379}
CONFIGS=${CONFIGS:-"plain memmiss redismiss redisrl auth full"}
mkdir -p "$WORK"; cd "$WORK"  # not the repo: `python -c` puts the working directory first on sys.path
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
TOKEN=$($PYTHON -c "import jwt,time; print(jwt.encode({'sub':'bench','exp':int(time.time())+3600}, '$SECRET', algorithm='HS256'))")
LIMIT="{requests: 1000000000, per: 1s, key: ip}"

defaults_of() { # configuration -> "defaults store"
  case $1 in
    plain) echo "{auth: none, rate_limit: off, cache: off}|memory://";;
    memmiss) echo "{auth: none, rate_limit: off, cache: {ttl: 1h}}|memory://";;
    redismiss) echo "{auth: none, rate_limit: off, cache: {ttl: 1h}}|redis://127.0.0.1:$REDIS/0";;
    redisrl) echo "{auth: none, rate_limit: $LIMIT, cache: off}|redis://127.0.0.1:$REDIS/0";;
    auth) echo "{auth: required, rate_limit: off, cache: off}|memory://";;
    full) echo "{auth: required, rate_limit: $LIMIT, cache: {ttl: 1h}}|redis://127.0.0.1:$REDIS/0";;
  esac
}

for sha in "$@"; do
  [ -d "$WORK/$sha" ] || git -C "$REPO" worktree add -q --detach "$WORK/$sha" "$sha"
  declare -A PIDS=()
  port=18600
  for config in $CONFIGS; do
    port=$((port + 1))
    IFS='|' read -r defaults store <<< "$(defaults_of "$config")"
    printf 'listen: {host: 127.0.0.1, port: %s}\nadmin: off\njwt: {algorithms: [HS256], secret: %s}\nstore: {url: "%s", timeout: 1s}\ndefaults: %s\nservices:\n  static: {upstreams: ["http://127.0.0.1:%s"]}\n' \
      $port "$SECRET" "$store" "$defaults" "$BACKEND" > "$WORK/$sha-$config.yaml"
    PYTHONPATH=$WORK/$sha taskset -c 1 $PYTHON -c "import sys; sys.argv=['gateway','run','-c','$WORK/$sha-$config.yaml']; from gateway.cli import run; run()" \
      > "$WORK/$sha-$config.log" 2>&1 &
    PIDS[$config]="$! $port"
  done
  sleep 8  # the gateways starting on one core
  for round in 1 2; do
    for config in $CONFIGS; do
      set -- ${PIDS[$config]}; pid=$1; url=http://127.0.0.1:$2/api/static/hello.json
      header="X-Bench: 1"
      case $config in auth|full) header="Authorization: Bearer $TOKEN";; esac
      curl -s -o /dev/null -H "$header" "$url?warm"
      perf stat -e instructions:u,task-clock -p "$pid" -o "$WORK/perf.txt" -- sleep 5 &
      meter=$!; sleep 0.3
      out=$(taskset -c 0 wrk -t1 -c64 -d4s -H "$header" -s "$REPO/bench/unique_query.lua" "$url" -- "$sha-$config-$round-$RANDOM")
      wait $meter
      reqs=$(echo "$out" | awk '/requests in/{print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
      iu=$(awk '/instructions:u/{gsub(",","",$1); print $1}' "$WORK/perf.txt")
      tc=$(awk '/task-clock/{gsub(",","",$1); print $1}' "$WORK/perf.txt")
      echo "$sha $round $config $(python3 -c "print(f'{$rps:.0f} {$iu/$reqs/1000:.0f} {$tc*1000/$reqs:.0f}')")"
    done
  done
  for config in "${!PIDS[@]}"; do set -- ${PIDS[$config]}; kill "$1"; done
  sleep 1
done
