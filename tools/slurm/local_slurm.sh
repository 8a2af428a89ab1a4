#!/usr/bin/env bash
# A single-node SLURM on this machine, for `make test-slurm`: Debian's slurm-wlm (slurmctld,
# slurmd), slurmdbd with MariaDB (so that sacct works, as on a real cluster) and munge. No systemd
# is assumed: the daemons are started directly, as root, with their files under $SLURM_LOCAL_DIR.
#
#   bash tools/slurm/local_slurm.sh start     # installs the packages if missing, starts, waits until the node is idle
#   bash tools/slurm/local_slurm.sh stop      # cancels every job, stops the daemons
#   bash tools/slurm/local_slurm.sh env       # prints the SLURM_CONF line the clients need
#
# The configuration (slurm.conf, slurmdbd.conf) lives in $SLURM_LOCAL_DIR (default
# /tmp/scalenet_d2_slurm), never in /etc/slurm, so a machine's own SLURM is left alone; clients
# find it through SLURM_CONF. What the tests need: JobRequeue=1 (requeue on preemption, scontrol
# requeue), proctrack/linuxproc and task/none (no cgroups here), a partition "debug" of this node's
# CPUs and no GPUs (a GPU request is refused, as on a CPU partition).
set -euo pipefail

dir=${SLURM_LOCAL_DIR:-/tmp/scalenet_d2_slurm}
export SLURM_CONF=$dir/slurm.conf
node=$(hostname -s)
packages=(slurm-wlm slurmdbd mariadb-server munge)
db_password=scalenet_d2_local

log() { echo "local_slurm: $*"; }

install_packages() {
  local missing=()
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "local_slurm: needs ${missing[*]} (Debian packages); install them as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$dir/apt.log" 2>&1 ||
    { echo "local_slurm: apt-get install failed, see $dir/apt.log" >&2; exit 1; }
}

write_configs() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$dir/spool/ctld" "$dir/spool/d" "$dir/log" "$dir/run"
  cat >"$dir/slurm.conf" <<CONF
ClusterName=scalenet_d2
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=300
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
  cat >"$dir/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$db_password
StorageLoc=slurm_acct_db
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/run/slurmdbd.pid
CONF
  chmod 600 "$dir/slurmdbd.conf"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq "$seconds"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "local_slurm: $what did not come up in ${seconds}s; logs in $dir/log" >&2
  exit 1
}

start() {
  mkdir -p "$dir"
  install_packages
  write_configs
  # munge: the packages' key, its daemon
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
  fi
  wait_for 20 munge munge -n
  # MariaDB on its default socket, and the accounting database's user
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if ! mariadb-admin ping >/dev/null 2>&1; then
    (mariadbd --user=mysql >"$dir/log/mariadb.log" 2>&1 &)
  fi
  wait_for 60 MariaDB mariadb-admin ping
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$db_password';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  running "$dir/run/slurmdbd.pid" || /usr/sbin/slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster scalenet_d2 >/dev/null 2>&1 || true
  running "$dir/run/slurmctld.pid" || /usr/sbin/slurmctld
  wait_for 60 slurmctld scontrol ping
  running "$dir/run/slurmd.pid" || /usr/sbin/slurmd
  wait_for 60 "the node" bash -c "sinfo -h -n $node -o %t | grep -qE '^(idle|mix|alloc)'"
  scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
  log "up: partition debug on $node ($(nproc) CPUs); clients need: export SLURM_CONF=$SLURM_CONF"
}

stop() {
  if [ -f "$SLURM_CONF" ]; then
    scancel --user="$(id -un)" >/dev/null 2>&1 || true
  fi
  for daemon in slurmd slurmctld slurmdbd; do
    if running "$dir/run/$daemon.pid"; then kill "$(cat "$dir/run/$daemon.pid")" || true; fi
  done
  mariadb-admin shutdown >/dev/null 2>&1 || true
  log "stopped (munged left running)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
