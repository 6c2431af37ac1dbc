#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests/test_slurm.py (run as root):
#   bash tests/slurm/setup_slurm.sh        install (Debian packages), configure, start; idempotent
#   bash tests/slurm/setup_slurm.sh stop   stop the daemons it started
# One node and one partition, both named after `hostname`, with the CPUs and memory `slurmd -C`
# finds. Root runs everything (SlurmUser=root) and no cgroups are needed (proctrack/linuxproc,
# task/none), so it also works in a container. A slurm.conf this script did not write is never
# touched: on a real cluster, submit there instead.
set -euo pipefail
CONF=/etc/slurm/slurm.conf
MARK="# written by tests/slurm/setup_slurm.sh"
LOG_DIR=/var/log/slurm

stop_slurm() {
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
}
if [ "${1:-}" = stop ]; then
  stop_slurm
  [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "setup_slurm.sh: run as root (it installs packages and starts daemons)" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
fi

# munge: the authentication every Slurm message carries; a fresh random key per machine.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  munged --force
fi

# slurm.conf: one node as `slurmd -C` describes this machine, one default partition.
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  echo "setup_slurm.sh: $CONF exists and was not written by this script; not touching it" >&2; exit 1
fi
host=$(hostname)
node=$(slurmd -C | head -n 1)
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$LOG_DIR"
cat > "$CONF.new" <<EOF
$MARK
ClusterName=stages-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
$node State=UNKNOWN
PartitionName=$host Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF"; then
  mv "$CONF.new" "$CONF"
  stop_slurm  # running daemons would keep the old configuration
  sleep 1
else
  rm "$CONF.new"
fi

# Daemons (each forks into the background), then wait until the node takes jobs.
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  state=$(timeout 5 sinfo -h -n "$host" -o %T 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle|mixed|allocated|completing) echo "slurm: node $host $state"; exit 0 ;;
    down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "setup_slurm.sh: node $host did not become idle (state: ${state:-unknown}); see $LOG_DIR/" >&2
exit 1
