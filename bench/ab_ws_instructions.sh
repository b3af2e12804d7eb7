#!/bin/bash
# Instructions per WebSocket round trip of gateway commits, next to the minimal aiohttp relay
# (bench/README.md, "Where the microseconds go"). The WebSocket companion of ab_instructions.sh.
#
# An echo backend (ws_echo.py) on CPU 0; for each commit, one at a time: a git worktree in $WORK,
# a gateway relaying to the echo backend on CPU 1 and the minimal relay (minimal_ws_relay.py) on
# CPU 1, then in three rounds `perf stat -e instructions:u` around a 4 s `ws_client.py rtt` run
# (32 sockets, 64-byte text messages, on CPU 0) against each.
# Prints "commit round target round-trips kinstructions/round-trip cpu-us/round-trip".
#
# Needs perf (Debian: linux-perf). Ports 19100-19102 must be free.
# usage: bench/ab_ws_instructions.sh COMMIT...
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd); PYTHON=${PYTHON:-$REPO/.venv/bin/python}; BENCH=$REPO/bench
. "$REPO/bench/perf_counts.sh"
WORK=${WORK:-/tmp/ab-ws}; ROUNDS=${ROUNDS:-3}
mkdir -p "$WORK"; cd "$WORK"  # not the repo: `python -c` puts the working directory first on sys.path
taskset -c 0 $PYTHON "$BENCH/ws_echo.py" --port 19100 > "$WORK/echo.log" 2>&1 &
ECHO=$!
cat > "$WORK/routes.yaml" <<YAML
listen: {host: 127.0.0.1, port: 19101}
admin: off
defaults: {auth: none, rate_limit: off, cache: off}
services:
  echo:
    upstreams: ["http://127.0.0.1:19100"]
    websocket: {messages_per_second: 1000000, idle_timeout: 1h, ping_interval: 1h}
YAML

measure() { # pid url -> "round-trips kinstructions/rt cpu-us/rt"
  perf stat -e instructions:u,task-clock -p "$1" -o "$WORK/perf.txt" -- sleep 4.5 &
  local stat=$!
  local out
  out=$(cd "$BENCH" && taskset -c 0 $PYTHON ws_client.py rtt --url "$2" --clients 32 --warmup 0.3 --seconds 4)
  wait $stat
  $PYTHON - "$out" "$WORK/perf.txt" <<'PY'
import json, re, sys
trips = json.loads(sys.argv[1].strip().splitlines()[-1])["round_trips"]
text = open(sys.argv[2]).read()
instructions = int(re.search(r"([\d,]+)\s+instructions:u", text).group(1).replace(",", ""))
msec = float(re.search(r"([\d,.]+)\s+msec task-clock", text).group(1).replace(",", ""))
print(f"{trips} {instructions / trips / 1000:.0f}k {msec * 1000 / trips:.1f}us")
PY
}

for sha in "$@"; do
  [ -d "$WORK/$sha" ] || git -C "$REPO" worktree add -q --detach "$WORK/$sha" "$sha"
  PYTHONPATH=$WORK/$sha taskset -c 1 $PYTHON -c "import sys; sys.argv=['gateway','run','-c','$WORK/routes.yaml']; from gateway.cli import run; run()" \
    > "$WORK/$sha-gateway.log" 2>&1 &
  gateway=$!
  (cd "$BENCH" && exec taskset -c 1 $PYTHON minimal_ws_relay.py --upstream http://127.0.0.1:19100 --port 19102) \
    > "$WORK/minimal.log" 2>&1 &
  minimal=$!
  sleep 5
  for round in $(seq "$ROUNDS"); do
    echo "$sha $round gateway $(measure $gateway ws://127.0.0.1:19101/api/echo/ws)"
    echo "$sha $round minimal $(measure $minimal ws://127.0.0.1:19102/ws)"
  done
  kill $gateway $minimal; wait $gateway $minimal 2>/dev/null
done
kill $ECHO
