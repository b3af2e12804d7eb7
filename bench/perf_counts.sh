# Sourced by the instruction-counting scripts: stop with a clear message where perf cannot count
# instructions (a VM without a PMU driver: `perf stat -e instructions:u true` prints
# "<not supported>"), instead of measuring nothing. valgrind's callgrind counts instructions there.
if ! command -v perf >/dev/null 2>&1; then
  echo "$0: needs perf (Debian: linux-perf)" >&2; exit 2
fi
if perf stat -x, -e instructions:u true 2>&1 | grep -q "not supported"; then
  echo "$0: perf cannot count instructions on this machine (no PMU: 'perf stat -e instructions:u true' says <not supported>)" >&2
  exit 2
fi
