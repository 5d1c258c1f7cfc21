#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for trying and testing launch/*.sbatch
# (Debian 12, as root; no systemd needed):
#   tools/slurm_local.sh up      install munge and Slurm if missing, write slurm.conf for
#                                this host, start munged, slurmctld and slurmd, wait until
#                                the node is idle
#   tools/slurm_local.sh down    stop the three daemons
#   tools/slurm_local.sh status  sinfo
#   tools/slurm_local.sh running exit status 0 when slurmctld and slurmd run (at once, from
#                                their pid files; sinfo takes ~10 s to fail)
# It overwrites /etc/slurm/slurm.conf: use it on a development or CI machine, not on a
# machine that already belongs to a cluster.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (it starts system daemons)" >&2; exit 2; }
run_dir=/run/slurm
pidfiles=("$run_dir/slurmd.pid" "$run_dir/slurmctld.pid" /run/munge/munged.pid)

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing="" p
    for p in munge slurmctld slurmd slurm-client; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing </dev/null
}

start_munge() {
    # the package makes the key; without systemd nothing makes munged's runtime folder
    install -d -o munge -g munge -m 0755 /run/munge
    [ -s /etc/munge/munge.key ] || runuser -u munge -- /usr/sbin/mungekey --create
    running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged   # refuses root
    local i
    for i in $(seq 100); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "$0: munged did not answer" >&2
    exit 1
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    # not nproc: it answers OMP_NUM_THREADS when that is set (the tests set it to 1)
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    install -d -m 0755 /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$run_dir"
    cat >/etc/slurm/slurm.conf <<CONF
# written by millipede's tools/slurm_local.sh: one node, $cpus CPUs, for testing
ClusterName=millipede-local
SlurmctldHost=$host(127.0.0.1)
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
# OverSubscribe=YES: jobs submitted with --oversubscribe may share CPUs (tests/slurm runs
# its jobs at once on a 2-CPU machine); others get CPUs of their own as usual
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again only after cred_expire seconds (120 by default)
AuthInfo=cred_expire=10
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
ReturnToService=2
# finished jobs stay visible to scontrol show job for an hour (tests/slurm reads them)
MinJobAge=3600
# SIGTERM -> SIGKILL: Slurm's default; a job's ranks have this long to finish a checkpoint
KillWait=30
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$run_dir/slurmctld.pid
SlurmdPidFile=$run_dir/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
CONF
}

up() {
    install_packages
    start_munge
    write_conf
    # running already: read the slurm.conf just written; a changed node line needs a restart
    # (Slurm refuses to reconfigure it), which keeps the jobs (StateSaveLocation)
    if running "$run_dir/slurmctld.pid" && ! scontrol reconfigure; then
        echo "slurm: restarting slurmctld and slurmd for the new slurm.conf"
        stop "$run_dir/slurmd.pid"
        stop "$run_dir/slurmctld.pid"
    fi
    running "$run_dir/slurmctld.pid" || /usr/sbin/slurmctld </dev/null   # daemonizes
    running "$run_dir/slurmd.pid" || /usr/sbin/slurmd </dev/null
    local host i
    host=$(hostname -s)
    for i in $(seq 150); do
        if [ "$(sinfo -h -n "$host" -o %t 2>/dev/null)" = idle ]; then
            echo "slurm: node $host is idle ($(sinfo -h -n "$host" -o %c) CPUs, partition debug)"
            return 0
        fi
        sleep 0.2
    done
    echo "$0: the node did not become idle; the daemons' logs:" >&2
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2
    exit 1
}

stop() {   # the daemon of pid file $1, if it runs; waits up to 10 s for it to exit
    local p _
    running "$1" || return 0
    p=$(cat "$1")
    kill "$p"
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
}

down() {
    local f
    for f in "${pidfiles[@]}"; do stop "$f"; done
    echo "slurm: stopped"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo ;;
    running) running "$run_dir/slurmctld.pid" && running "$run_dir/slurmd.pid" ;;
    *) echo "usage: $0 up|down|status|running" >&2; exit 2 ;;
esac
