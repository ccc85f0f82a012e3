#!/usr/bin/env bash
# The whole tests/gpu on the borrowed GPU machine, for a run longer than one device call (about 25 minutes on
# an H200 started afresh with TSSC_REPEAT=10: BENCHMARKS.md session 16). `start` runs pytest in a process of
# its own session (setsid), which outlives the call while the machine stays warm; `wait` polls it, then
# prints its end or its progress; `stop` ends it (its whole process group: `pkill -f` on its command line
# would also match the shell of the call that runs it).
#
#   call 1:  . scripts/device_env.sh || exit 1; TSSC_REPEAT=10 scripts/gpu_suite.sh start; scripts/gpu_suite.sh wait 560
#   later:   PYTHONPATH=/tmp/site:$PWD scripts/gpu_suite.sh wait 580   (each call within the machine's idle window)
#
# Extra arguments to `start` go to pytest (`-x`, `-n 4 --dist loadfile` with the carried pytest-xdist wheel:
# the whole suite in 6.4 min on one H200, session 17). The log is
# $GPU_SUITE_DIR/log (default /tmp/gpu_suite), copied to $OUT/gpu_suite.log when OUT is set; `wait` exits with
# pytest's status once it has finished (5: no test collected), 0 while it runs, 3 when no run was started.
# PYTHON: the interpreter (default python3, the machine's).
set -u
dir=${GPU_SUITE_DIR:-/tmp/gpu_suite}
case "${1:-}" in
start)
  shift
  mkdir -p "$dir" && rm -f "$dir/rc" "$dir/log"
  setsid nohup bash -c '"$1" -m pytest tests/gpu -q -p no:cacheprovider -rfE --durations=40 "${@:2}" >"$0/log" 2>&1; echo $? >"$0/rc"' \
    "$dir" "${PYTHON:-python3}" "$@" >/dev/null 2>&1 &
  echo $! >"$dir/pid"
  echo "gpu_suite: started (pid $(cat "$dir/pid"), log $dir/log)"
  ;;
wait)
  [ -f "$dir/pid" ] || { echo "gpu_suite: no run started in $dir" >&2; exit 3; }
  deadline=$((SECONDS + ${2:-560}))
  while [ ! -f "$dir/rc" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 2; done
  [ -n "${OUT:-}" ] && cp "$dir/log" "$OUT/gpu_suite.log"
  if [ -f "$dir/rc" ]; then
    rc=$(cat "$dir/rc")
    echo "gpu_suite: finished, pytest exit $rc"
    tail -n 45 "$dir/log"
    exit "$rc"
  fi
  echo "gpu_suite: still running"
  tail -c 600 "$dir/log"
  ;;
stop)
  [ -f "$dir/pid" ] && kill -- "-$(cat "$dir/pid")" 2>/dev/null
  echo "gpu_suite: stopped"
  ;;
*)
  echo "usage: $0 start [pytest args...] | wait [seconds] | stop" >&2
  exit 2
  ;;
esac
