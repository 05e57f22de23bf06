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
for pidfile in "$dir"/slurmd-*.pid "$dir/slurmd.pid"; do stop "$pidfile"; done  # slurmd.pid: one-node clusters of before
stop "$dir/slurmctld.pid"
# the node names start.sh mapped to this host (rewritten in place: /etc/hosts may be a mount)
kept=$(grep -vE '^127\.0\.0\.1[[:space:]]+slurmllm-n[0-9]+$' /etc/hosts || true)
printf '%s\n' "$kept" >/etc/hosts
if [ "${1:-}" = "--munge" ]; then stop /run/munge/munged.pid; fi
echo "local Slurm stopped"
