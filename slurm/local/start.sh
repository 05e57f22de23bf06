#!/usr/bin/env bash
# Start a one-host Slurm on localhost (munge, slurmctld, slurmd) as root, without systemd.
# Installs Debian's packages when missing; idempotent: a running cluster is left as it is.
#   bash slurm/local/start.sh      then: export SLURM_CONF=${SLURM_LOCAL_DIR:-/tmp/slurm-llm-local}/slurm.conf
# Exit code 77 means "cannot run here" (not root, no apt-get): tests skip on it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${SLURM_LOCAL_DIR:-/tmp/slurm-llm-local}
node=$(hostname -s)
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

write_conf() {
  mkdir -p "$dir/state" "$dir/spool"
  local cpus
  cpus=$(nproc)
  sed -e "s|@NODE@|$node|g" -e "s|@CPUS@|$cpus|g" -e "s|@DIR@|$dir|g" \
    "$here/slurm.conf.in" >"$dir/slurm.conf.new"
  mv "$dir/slurm.conf.new" "$dir/slurm.conf"
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for_node() {
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
    case "$state" in
      idle|mixed|allocated|completing) echo "local Slurm is up: node $node $state; SLURM_CONF=$SLURM_CONF"; return ;;
      down*|drain*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  echo "slurm/local/start.sh: node $node did not become idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || cannot "needs root (it starts munged, slurmctld and slurmd)"
install_packages
start_munge
if ! alive "$dir/slurmctld.pid" || ! alive "$dir/slurmd.pid"; then
  write_conf
  alive "$dir/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
  alive "$dir/slurmd.pid" || slurmd -f "$SLURM_CONF"
fi
wait_for_node
