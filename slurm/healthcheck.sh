#!/usr/bin/env bash
# Per-node GPU check before training: GPU count, memory per GPU, no uncorrected ECC errors and
# no Xid in the kernel log. Run by the sbatch as one srun task per node; a failure prints
# "healthcheck FAILED on <node>: <reason>" and exits 1, so the job stops with the bad node named
# instead of hanging in NCCL. A node without nvidia-smi (a CPU test cluster) passes as a no-op.
#   healthcheck.sh EXPECTED_GPUS MIN_GPU_MEMORY_GIB
set -euo pipefail
expected=${1:?usage: healthcheck.sh EXPECTED_GPUS MIN_GPU_MEMORY_GIB}
min_gib=${2:?usage: healthcheck.sh EXPECTED_GPUS MIN_GPU_MEMORY_GIB}
node=$(hostname -s)

fail() { echo "healthcheck FAILED on $node: $*" >&2; exit 1; }

if ! command -v nvidia-smi >/dev/null; then
  echo "healthcheck on $node: no nvidia-smi (CPU node), skipped"
  exit 0
fi
gpus=$(nvidia-smi --query-gpu=index,memory.total,ecc.errors.uncorrected.volatile.total \
       --format=csv,noheader,nounits) || fail "nvidia-smi failed (driver or GPU lost?)"
count=$(grep -c . <<<"$gpus" || true)
[ "$count" -ge "$expected" ] || fail "$count GPUs visible, expected $expected"
# A GPU reports a little less than its nominal size (an 80 GB H100: 81559 MiB): allow 5%.
min_mib=$(awk -v g="$min_gib" 'BEGIN { printf "%d", g * 1024 * 0.95 }')
while IFS=', ' read -r index mem_mib ecc; do
  [ "$mem_mib" -ge "$min_mib" ] || fail "GPU $index has $mem_mib MiB, expected >= $min_mib MiB"
  case "$ecc" in ''|0|'[N/A]'|'N/A') ;; *) fail "GPU $index has $ecc uncorrected ECC errors" ;; esac
done <<<"$gpus"
# Xid errors are logged by the driver in the kernel log; read it where permitted.
if xid=$(dmesg 2>/dev/null | grep -m1 'NVRM: Xid'); then
  fail "kernel log reports a GPU Xid error: $xid"
fi
echo "healthcheck on $node: $count GPUs ok"
