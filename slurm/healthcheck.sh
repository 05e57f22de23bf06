#!/usr/bin/env bash
# Per-node GPU/EFA check: GPU count, memory per GPU, no uncorrected ECC errors, no fatal Xid in
# the recent kernel log, and (where EFA is expected) the node's EFA devices. A failure prints
# "healthcheck FAILED on <node>: <reason>" and exits 1 so the bad node is named instead of NCCL
# hanging on it. A node without nvidia-smi (a CPU test cluster) passes as a no-op.
#   healthcheck.sh EXPECTED_GPUS MIN_GPU_MEMORY_GIB [EXPECTED_EFA_DEVICES]
# EXPECTED_EFA_DEVICES 0 (default): EFA not checked. HEALTHCHECK_XID_WINDOW_S: how far back, in
# seconds, an Xid counts (default 3600: an Xid older than that happened before this job's node
# was handed over; a still-broken GPU shows in the checks above or in a fresh Xid).
set -euo pipefail
expected=${1:?usage: healthcheck.sh EXPECTED_GPUS MIN_GPU_MEMORY_GIB [EXPECTED_EFA_DEVICES]}
min_gib=${2:?usage: healthcheck.sh EXPECTED_GPUS MIN_GPU_MEMORY_GIB [EXPECTED_EFA_DEVICES]}
efa_expected=${3:-0}
window_s=${HEALTHCHECK_XID_WINDOW_S:-3600}
# Slurm's name for the node where it runs one (PCS and HyperPod node names differ from host
# names): the name slurm/node_failed.sh drains and excludes.
node=${SLURMD_NODENAME:-$(hostname -s)}
# Xids that mean the GPU or its links are broken and the node must be replaced, as AWS's GPU
# health-check suite classifies them (aws-samples/awsome-distributed-training,
# 4.validation_and_observability/2.gpu-cluster-healthcheck; shared/ARCHITECTURE.md): 48 double-bit
# ECC, 63/64 row remapping, 74 NVLink, 79 fallen off the bus, 92 high single-bit ECC rate, 94/95
# contained/uncontained ECC. Others (13, 31, 43: a program's fault or its cleanup) are
# "monitor only" there, and logged as informational here.
FATAL_XIDS=" 48 63 64 74 79 92 94 95 "

fail() { echo "healthcheck FAILED on $node: $*" >&2; exit 1; }
warn() { echo "healthcheck WARNING on $node: $*" >&2; }

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

# The kernel log with "[seconds since boot]" stamps: dmesg where permitted, else the journal's
# kernel messages in the same format (dmesg_restrict=1 hides dmesg from non-root users). Read
# whole into a variable: a pipe into `grep -m1` under pipefail fails when grep stops early.
log_ok=1
if ! log=$(dmesg 2>&1); then
  why="${log%%$'\n'*}"  # dmesg names itself: "dmesg: read kernel buffer failed: ..."
  if ! command -v journalctl >/dev/null; then
    log_ok=0; why="$why; no journalctl"
  elif ! log=$(journalctl -k -b -o short-monotonic -q --no-pager 2>&1); then
    log_ok=0; why="$why; journalctl: ${log%%$'\n'*}"
  fi
fi
if [ "$log_ok" = 1 ]; then
  uptime_s=$(cut -d' ' -f1 /proc/uptime)
  # "[ 1234.567890] ... NVRM: Xid (PCI:0000:53:00): 79, pid=..., ..." -> "seconds xid line"
  xids=$(awk -v since="$(awk -v u="$uptime_s" -v w="$window_s" 'BEGIN { print u - w }')" '
    /NVRM: Xid/ { t = $0; sub(/^[^[]*\[ */, "", t); sub(/\].*/, "", t)
                  x = $0; sub(/.*NVRM: Xid \([^)]*\): */, "", x); sub(/[^0-9].*/, "", x)
                  if (t + 0 >= since) print x "\t" $0 }' <<<"$log")
  while IFS=$'\t' read -r xid line; do
    [ -n "$xid" ] || continue
    case "$FATAL_XIDS" in
      *" $xid "*) fail "fatal GPU Xid $xid in the last ${window_s}s: $line" ;;
      *) echo "healthcheck on $node: informational Xid $xid (not a hardware fault): $line" ;;
    esac
  done <<<"$xids"
else
  warn "kernel log unreadable, Xid errors not checked ($why)"
fi

if [ "$efa_expected" -gt 0 ]; then
  command -v fi_info >/dev/null || fail "fi_info not found: EFA expected but libfabric (/opt/amazon/efa) missing"
  efa=$(fi_info -p efa -t FI_EP_RDM 2>&1) || fail "fi_info -p efa failed: ${efa%%$'\n'*}"
  # One RDM domain per EFA device (rdmap<bus>s<slot>-rdm); p5.48xlarge has 32, p4d.24xlarge 4.
  devices=$(grep -o 'domain: *[^ ]*-rdm' <<<"$efa" | sort -u | grep -c . || true)
  [ "$devices" -ge "$efa_expected" ] || fail "$devices EFA devices, expected $efa_expected"
fi
echo "healthcheck on $node: $count GPUs ok"
