#!/usr/bin/env bash
# A requeued attempt waits, before its first job step, until slurmctld holds no RPC for this
# job's nodes (at most LIMIT_S seconds; sdiag's "Pending RPCs").
#   settle.sh LIMIT_S
# Why: a requeued job keeps its job id and numbers its steps from 0 again. When the previous
# attempt ended with a node unreachable, slurmctld keeps retrying the signal it sent that
# attempt's step (srun --kill-on-bad-exit's "Terminating StepId=<job>.1": REQUEST_SIGNAL_TASKS)
# every 60 s until the node answers within MessageTimeout. Once the node is back it reaches the
# new attempt's step of the same id and kills it, and the ranks' SIGTERM save outlasts the
# timeout, so it is retried again: seen on the local two-node cluster (one node death, 4 restarts;
# tests/integration/test_slurm_nodes.py). With no step of that id yet, the node answers at once
# and the retry is done. Other jobs' RPCs to these nodes only make this wait up to LIMIT_S.
set -uo pipefail
limit_s=${1:?usage: settle.sh LIMIT_S}
ours=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" 2>/dev/null | sort -u)

pending() {  # the pending RPCs' nodes that are ours (sdiag: "  1: REQUEST_SIGNAL_TASKS  <nodes>")
  local nodes
  nodes=$(sdiag 2>/dev/null | sed -n '/^Pending RPCs/,$p' | awk 'NR > 1 && NF >= 3 {print $3}')
  [ -n "$nodes" ] || return 0
  comm -12 <(for n in $nodes; do scontrol show hostnames "$n"; done | sort -u) <(echo "$ours")
}

deadline=$((SECONDS + limit_s))
waited=""
while nodes=$(pending) && [ -n "$nodes" ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "settle: slurmctld still holds RPCs for $(echo $nodes) after ${limit_s} s; starting anyway" >&2
    exit 0
  fi
  waited=1
  sleep 2
done
[ -z "$waited" ] || echo "settle: waited $((SECONDS)) s for slurmctld's pending RPCs to this job's nodes" >&2
