#!/usr/bin/env bash
# Start a one-host Slurm of two nodes on localhost (munge, slurmctld, one slurmd per node) as
# root, without systemd. Installs Debian's packages when missing; idempotent: a running cluster
# with the same slurm.conf is left as it is (one with another is restarted).
#   bash slurm/local/start.sh      then: export SLURM_CONF=${SLURM_LOCAL_DIR:-/tmp/slurm-llm-local}/slurm.conf
# Exit code 77 means "cannot run here" (not root, no apt-get): tests skip on it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${SLURM_LOCAL_DIR:-/tmp/slurm-llm-local}
host=$(hostname -s)
nodes=(slurmllm-n1 slurmllm-n2)  # slurm.conf.in names them
export SLURM_CONF=$dir/slurm.conf

cannot() { echo "slurm/local/start.sh: $*" >&2; exit 77; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || cannot "slurmctld/slurmd/munge are missing and there is no apt-get"
  export DEBIAN_FRONTEND=noninteractive
  local pkgs=(slurm-wlm slurmctld slurmd slurm-client munge)
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null; } \
    || cannot "apt-get could not install ${pkgs[*]}"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  local key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then  # 1024 random bytes, owned by munge, mode 400 (munged refuses anything looser)
    install -d -o munge -g munge -m 700 /etc/munge
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    chown munge:munge "$key" && chmod 400 "$key"
  fi
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
}

# The conf this start wants; "changed" when a cluster runs with another one (restarted then).
new_conf() {
  mkdir -p "$dir/state"
  sed -e "s|@HOST@|$host|g" -e "s|@CPUS@|$(nproc)|g" -e "s|@DIR@|$dir|g" \
    "$here/slurm.conf.in" >"$dir/slurm.conf.new"
  if cmp -s "$dir/slurm.conf.new" "$dir/slurm.conf"; then rm "$dir/slurm.conf.new"; return 1; fi
}

# The node names resolve to this host: the ranks rendezvous on the first node's name.
map_nodes() {
  local name
  for name in "${nodes[@]}"; do
    grep -qE "^127\.0\.0\.1[[:space:]]+$name\$" /etc/hosts || echo "127.0.0.1 $name" >>/etc/hosts
  done
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for_node() {
  local node=$1 state
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
    case "$state" in
      idle|mixed|allocated|completing) echo "local Slurm node $node is $state; SLURM_CONF=$SLURM_CONF"; return ;;
      down*|drain*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  echo "slurm/local/start.sh: node $node did not become idle; see $dir/slurmctld.log and $dir/slurmd-$node.log" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || cannot "needs root (it starts munged, slurmctld and slurmd)"
install_packages
start_munge
if new_conf; then  # first start, or a cluster of another slurm.conf (e.g. the one-node one)
  bash "$here/stop.sh" >/dev/null  # it also removes the node names from /etc/hosts
  mv "$dir/slurm.conf.new" "$dir/slurm.conf"
fi
map_nodes  # after the stop: mapped before it, a fresh machine's first start ran unmapped
alive "$dir/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
for node in "${nodes[@]}"; do
  mkdir -p "$dir/spool-$node"
  alive "$dir/slurmd-$node.pid" || slurmd -f "$SLURM_CONF" -N "$node"
done
for node in "${nodes[@]}"; do wait_for_node "$node"; done
