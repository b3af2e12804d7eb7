#!/bin/bash
# User-space instructions of one Python statement, run N times in a loop inside a running uvloop
# event loop (so the statement may be an `await`), counted by `perf stat --control` only while the
# loop runs, less the same loop with `pass`. Twice, to show the spread (usually under 0.1%).
# Quieter than anything driven by wrk: for telling apart pieces of a few thousand instructions.
# Not run by `make bench`. Needs perf (Debian: linux-perf).
#
# usage: bench/inproc_instructions.sh SETUP STATEMENT [N]
#   SETUP      Python run once first (imports, objects); it may define async functions
#   STATEMENT  one line, run N times inside `async def main()`
# e.g.
#   bench/inproc_instructions.sh "import hiredis" "hiredis.pack_command(('GET', 'k'))" 20000
#   bench/inproc_instructions.sh "$(cat my_setup.py)" "await store.take('k', limit=5, period=1.0)" 3000
set -eu
SETUP=$1; STATEMENT=$2; N=${3:-10000}
PYTHON=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
. "$(dirname "$0")/perf_counts.sh"

count() { # statement -> instructions counted around its loop
  local dir; dir=$(mktemp -d)
  mkfifo "$dir/ctl" "$dir/ack"
  perf stat -x, -e instructions:u -D -1 --control "fifo:$dir/ctl,$dir/ack" -o "$dir/out" \
    "$PYTHON" - "$dir" "$N" "$1" <<EOF >/dev/null 2>"$dir/err" || { grep -v '^Events' "$dir/err" >&2; exit 1; }
import gc, sys, uvloop
$SETUP
_dir, _n, _statement = sys.argv[1], int(sys.argv[2]), sys.argv[3]
_ctl, _ack = open(f"{_dir}/ctl", "w"), open(f"{_dir}/ack")

def _perf(command):
    _ctl.write(command + "\n"); _ctl.flush(); _ack.readline()

_scope = dict(globals())
exec(f"async def _loop(_n, _perf):\n    _perf('enable')\n    for _ in range(_n):\n        {_statement}\n    _perf('disable')\n", _scope)
gc.collect()
uvloop.run(_scope["_loop"](_n, _perf))
EOF
  awk -F, '/instructions/{print $1}' "$dir/out"
  rm -rf "$dir"
}

for round in 1 2; do
  used=$(count "$STATEMENT"); empty=$(count "pass")
  echo "round $round: $(( (used - empty) / N )) instructions per statement"
done
