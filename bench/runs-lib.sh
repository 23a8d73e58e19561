# Sourced by bench/ref-runs.sh and bench/esp-runs.sh (not run on its own):
# what both need around the processes of a reference run, so that every run
# stops by itself and leaves nothing behind.
#
#   runs_init PREFIX   makes $run (a fresh /tmp/PREFIX.XXXXXX) and sets the
#                      traps: on any exit every PID in $pids is stopped and
#                      $run removed; SIGINT/SIGTERM exit with 130.
#   stop_process PID   SIGTERM, up to 5 s for it to go, then SIGKILL; reaps it.

stop_process() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

runs_cleanup() {
  local p
  # TERM them all first, so they wind down side by side, then one by one.
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do stop_process "$p"; done
  rm -rf "$run"
}

runs_init() {
  run=$(mktemp -d "/tmp/$1.XXXXXX")
  pids=()
  trap runs_cleanup EXIT
  trap 'exit 130' INT TERM
}
