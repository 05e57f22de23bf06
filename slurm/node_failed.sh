#!/usr/bin/env bash
# After the per-node health check failed (clusters without HyperPod's auto-resume: PCS, other
# Slurm sites): name the bad nodes, drain them where the user may, and requeue the job without
# them. Writes what it did to RUN_DIR/bad-nodes, then runs ALERT... (megatron_ext.job_end, which
# posts that report) before the requeue: a requeue ends this batch script and its children.
#   node_failed.sh HEALTHCHECK_LOG NODES_IN_JOB RUN_DIR MAX_RESTARTS REQUEUE(1|0) [ALERT...]
# HEALTHCHECK_LOG holds healthcheck.sh's output of every node ("healthcheck FAILED on <node>:
# <reason>"). When every node failed, the job's expectations (cluster.gpus_per_node,
# cluster.gpu_memory_gib, cluster.efa_devices) are more likely wrong than every node at once:
# nothing is drained and the job is not requeued.
set -uo pipefail
log=${1:?usage: node_failed.sh HEALTHCHECK_LOG NODES_IN_JOB RUN_DIR MAX_RESTARTS REQUEUE}
nodes_in_job=${2:?}; run_dir=${3:?}; max_restarts=${4:?}; requeue=${5:?}
shift 5
report="$run_dir/bad-nodes"
failed=$(sed -n 's/^healthcheck FAILED on \([^:]*\): \(.*\)$/\1\t\2/p' "$log" | sort -u -t$'\t' -k1,1)
count=$(grep -c . <<<"$failed" || true)
alert_cmd=("$@")
say() { echo "$*" | tee -a "$report" >&2; }
# Posts the report as it stands; a failed post is left to the batch log.
alert() { [ "${#alert_cmd[@]}" -eq 0 ] || "${alert_cmd[@]}" || true; }
trap alert EXIT
: >"$report"
if [ "$count" -eq 0 ]; then
  say "the node health check failed without naming a node (srun itself failed?); see $log"
  exit 0
fi
while IFS=$'\t' read -r node reason; do say "node $node failed the health check: $reason"; done <<<"$failed"
if [ "$count" -ge "$nodes_in_job" ]; then
  say "every node failed: check cluster.gpus_per_node, cluster.gpu_memory_gib and" \
      "cluster.efa_devices against these nodes; none drained, job not requeued"
  exit 0
fi
bad=$(cut -f1 <<<"$failed" | paste -sd, -)
while IFS=$'\t' read -r node reason; do
  # Draining needs Slurm operator rights (scontrol: "Access/permission denied" otherwise); the
  # node keeps its running jobs and gets no new ones until an administrator resumes it.
  if out=$(scontrol update nodename="$node" state=drain reason="slurm-llm healthcheck: ${reason:0:200}" 2>&1); then
    say "drained $node"
  else
    say "could not drain $node (${out%%$'\n'*}): ask an administrator to drain it"
  fi
done <<<"$failed"
[ "$requeue" = 1 ] || { say "not requeued (cluster.requeue=false)"; exit 0; }
# Counted with the batch script's other failed attempts (cluster.max_restarts): a job that keeps
# meeting bad nodes is given up instead of excluding node after node.
failures=$(( $(cat "$run_dir/failures" 2>/dev/null || echo 0) + 1 )); echo "$failures" >"$run_dir/failures"
if [ "$failures" -gt "$max_restarts" ]; then
  say "failed $failures times, not requeued (cluster.max_restarts=$max_restarts)"; exit 0
fi
# The nodes this job already excludes (ExcNodeList=(null) when none) plus the bad ones.
old=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/.*ExcNodeList=\([^ ]*\).*/\1/p')
[ -z "$old" ] || [ "$old" = "(null)" ] || bad="$old,$bad"
say "requeued (restart $failures of cluster.max_restarts=$max_restarts) excluding $bad"
trap - EXIT; alert  # before the requeue, which ends this batch script and its children
# Slurm ends the script on the requeue (SIGTERM, then SIGKILL after KillWait, 30 s by default):
# the SIGTERM is ignored until the node list is updated and the hold released. Held meanwhile,
# so the scheduler cannot start the job on a bad node in between (a job's owner may hold,
# update and release a pending job of theirs).
trap '' TERM
if ! out=$(scontrol requeuehold "$SLURM_JOB_ID" 2>&1 && scontrol update jobid="$SLURM_JOB_ID" \
           ExcNodeList="$bad" 2>&1 && scontrol release "$SLURM_JOB_ID" 2>&1); then
  echo "requeue without $bad failed (${out%%$'\n'*}); scontrol release $SLURM_JOB_ID if it is held" >&2
  exit 1
fi
