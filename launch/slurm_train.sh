#!/usr/bin/env bash
# The body of launch/train.sbatch and launch/train-gpu.sbatch (docs/slurm.md): runs
# `millipede train` on every task of the allocation, forwards the preemption signal to the
# ranks, and requeues the job when the trainer says it checkpointed and should be requeued.
#
#   bash launch/slurm_train.sh CONFIG.ini [millipede train options]...
#
# Environment: MILLIPEDE (binary, default build/millipede), MP_LAUNCHER (srun | mpirun,
# default srun when it has PMIx, else mpirun), MP_MPIRUN_ARGS (extra mpirun arguments).
set -uo pipefail
CONFIG=${1:?usage: sbatch launch/train.sbatch CONFIG.ini [--set section.key=value]...}
shift
MILLIPEDE=${MILLIPEDE:-build/millipede}
REQUEUE=75   # millipede's exit status "checkpointed, please requeue" (docs/checkpoints.md)

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm_train.sh: not inside a Slurm job (submit launch/train.sbatch with sbatch)" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# ranks that wait in MPI must not spin on cores another rank needs (harmless otherwise)
export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
echo "== $(date -u +%FT%TZ) job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)), " \
     "$SLURM_NTASKS tasks on ${SLURM_JOB_NODELIST:-?}: $MILLIPEDE train $CONFIG $*"

# srun with PMIx is the native launcher; mpirun inside the allocation is the fallback
if [ -z "${MP_LAUNCHER:-}" ]; then
    if srun --mpi=list 2>&1 | grep -q pmix; then MP_LAUNCHER=srun; else MP_LAUNCHER=mpirun; fi
fi
case $MP_LAUNCHER in
    srun) launch=(srun --mpi=pmix --kill-on-bad-exit=1) ;;
    mpirun) read -ra extra <<< "${MP_MPIRUN_ARGS:-}"
            launch=(mpirun -n "$SLURM_NTASKS" "${extra[@]}") ;;
    *) echo "slurm_train.sh: MP_LAUNCHER must be srun or mpirun, not '$MP_LAUNCHER'" >&2; exit 2 ;;
esac

# --signal=B:USR1@T sends USR1 to this shell only, and bash runs a trap only between
# commands: so the launcher runs in the background and the trap passes USR1 on (srun and
# mpirun both forward it to every rank). SIGTERM is passed on as USR1 too: mpirun answers a
# SIGTERM by killing the ranks, which must instead finish their checkpoint.
child=
forward() {
    echo "== $(date -u +%FT%TZ) got SIG$1: asking the ranks to checkpoint and stop"
    [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

"${launch[@]}" "$MILLIPEDE" train "$CONFIG" "$@" &
child=$!
while :; do   # a trapped signal ends `wait` early: wait until the launcher has exited
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
done
trap - USR1 TERM

if [ "$status" -eq "$REQUEUE" ]; then
    echo "== $(date -u +%FT%TZ) checkpointed (status $REQUEUE): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "== scontrol requeue failed: resubmit; training resumes from run.dir/checkpoints/latest"
fi
echo "== $(date -u +%FT%TZ) millipede exited with status $status"
exit "$status"
