#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` and for trying
# the SLURM recipes of docs/slurm.md locally. Needs root and Debian/Ubuntu (apt-get).
#
#   scripts/slurm_cluster.sh start    # install if needed, start munged, slurmctld, slurmd
#   scripts/slurm_cluster.sh status   # sinfo
#   scripts/slurm_cluster.sh stop     # stop the daemons this script started
#
# State, spool, logs and slurm.conf live in $SLURM_FIXTURE_DIR (default /tmp/trainer-slurm).
# /etc/slurm/slurm.conf is linked to that slurm.conf (unless the machine has its own), so
# sinfo, sbatch and scontrol work without SLURM_CONF. Accounting is off, as on many small
# clusters: sacct fails, which the trainer's launcher handles (docs/slurm.md).
set -euo pipefail

DIR="${SLURM_FIXTURE_DIR:-/tmp/trainer-slurm}"
CONF="$DIR/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
# A requeued job may not start again before the old job's credential has expired:
# cred_expire (default 120 s) is the ~2 minutes a requeued job waits in BeginTime.
CRED_EXPIRE_S="${SLURM_FIXTURE_CRED_EXPIRE_S:-5}"

log() { echo "slurm_cluster: $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sinfo >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || { log "not root: cannot install SLURM"; exit 1; }
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
}

write_conf() {
  local host node
  host="$(hostname -s)"
  # slurmd's view of this machine (CPUs, sockets, cores, memory) is the node definition.
  node="$(slurmd -C | head -n 1)"
  mkdir -p "$DIR/ctld" "$DIR/d" "$DIR/log"
  cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a one-node test cluster.
ClusterName=trainer-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE_S
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Schedule eligible jobs (a requeued one, once its BeginTime passes) within seconds.
SchedulerParameters=sched_interval=2,bf_interval=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or timed out: the
# trainer saves within a step, so 10 s is plenty, and a test of scancel waits no longer.
KillWait=10
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$node
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge
  chmod 400 /etc/munge/munge.key
  # --force: runs as root-owned container user setups too (no systemd here).
  runuser -u munge -- munged --force 2>/dev/null || munged --force
}

start() {
  install
  if sinfo -h -o %T 2>/dev/null | grep -q idle; then
    log "already running"; sinfo; return
  fi
  write_conf
  if [ ! -e "$ETC_CONF" ] || [ "$(readlink "$ETC_CONF" || true)" = "$CONF" ]; then
    mkdir -p /etc/slurm && ln -sfn "$CONF" "$ETC_CONF"
  fi
  export SLURM_CONF="$CONF"
  start_munge
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -q idle; then
      sinfo
      return
    fi
    sleep 0.5
  done
  log "the node did not become idle in 30 s; logs in $DIR/log:"
  tail -n 20 "$DIR"/log/*.log >&2 || true
  exit 1
}

stop_pidfile() {
  local file="$1" pid
  [ -s "$file" ] || return 0
  pid="$(cat "$file")"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$file"
}

stop() {
  stop_pidfile "$DIR/slurmd.pid"
  stop_pidfile "$DIR/slurmctld.pid"
  if [ "$(readlink "$ETC_CONF" 2>/dev/null || true)" = "$CONF" ]; then
    rm -f "$ETC_CONF"
  fi
  # munged stays: other software on the machine may use it.
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF="$CONF" sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
