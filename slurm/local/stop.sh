#!/usr/bin/env bash
# Stop the daemons slurm/local/start.sh started (by their pid files); munged is left running
# unless --munge is given, since other software on the host may use it.
set -euo pipefail
dir=${SLURM_LOCAL_DIR:-/tmp/slurm-llm-local}
stop() {
  [ -s "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "stop.sh: $1 ($pid) still running" >&2
}
stop "$dir/slurmd.pid"
stop "$dir/slurmctld.pid"
if [ "${1:-}" = "--munge" ]; then stop /run/munge/munged.pid; fi
echo "local Slurm stopped"
