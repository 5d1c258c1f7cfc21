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
# First thing: remember a USR1/TERM (bash's default for both would end the job here, and the
# signal with it); it is passed on once the launcher runs (below). term: a SIGTERM came.
got='' term=''
trap 'got=${got:-USR1}' USR1
trap 'got=${got:-TERM}; term=1' TERM
CONFIG=${1:?usage: sbatch launch/train.sbatch CONFIG.ini [--set section.key=value]...}
shift
MILLIPEDE=${MILLIPEDE:-build/millipede}
REQUEUE=75   # millipede's exit status "checkpointed, please requeue" (docs/checkpoints.md)

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm_train.sh: not inside a Slurm job (submit launch/train.sbatch with sbatch)" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# since Slurm 22.05 srun does not inherit the job's --cpus-per-task: without this every rank
# of the step is bound to one CPU and its OpenMP threads share it
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
# ranks that wait in MPI must not spin on cores another rank needs (harmless otherwise)
export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
# srun with PMIx is the native launcher; mpirun inside the allocation is the fallback
if [ -z "${MP_LAUNCHER:-}" ]; then
    if srun --mpi=list 2>&1 | grep -q pmix; then MP_LAUNCHER=srun; else MP_LAUNCHER=mpirun; fi
fi
case $MP_LAUNCHER in
    # --kill-on-bad-exit=0: 75 is a bad exit to srun, and with =1 the first rank to exit 75
    # gets the others killed while they finalize (srun then returns 137: no requeue).
    # --wait=60: a rank that dies ends the step 60 s later instead of leaving the others
    # waiting for it until the time limit; ranks that finish normally leave MPI_Finalize
    # together, well within 60 s of each other.
    srun) launch=(srun --mpi=pmix --kill-on-bad-exit=0 --wait=60) ;;
    # Slurm sends SIGTERM to every process of the job (time limit, scancel, preemption):
    # the ranks take it as a request to checkpoint, but mpirun answers it by killing them
    # 1 s later, in the middle of their checkpoint. So mpirun starts with SIGTERM blocked
    # (it leaves it blocked; its ranks start with every signal unblocked) and never sees it;
    # it still forwards USR1. A larger odls_base_sigkill_timeout would do too, but mpirun
    # also waits that long (twice over) after every exit status 75.
    mpirun) read -ra extra <<< "${MP_MPIRUN_ARGS:-}"
            launch=(mpirun -n "$SLURM_NTASKS" "${extra[@]}")
            if env --block-signal=TERM true 2>/dev/null; then   # GNU coreutils >= 9.0
                launch=(env --block-signal=TERM "${launch[@]}")
            else
                echo "slurm_train.sh: warning: this env cannot block SIGTERM (coreutils < 9):" \
                     "a SIGTERM to the job makes mpirun kill the ranks before their checkpoint" >&2
            fi ;;
    *) echo "slurm_train.sh: MP_LAUNCHER must be srun or mpirun, not '$MP_LAUNCHER'" >&2; exit 2 ;;
esac

echo "== $(date -u +%FT%TZ) job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)), " \
     "$SLURM_NTASKS tasks on ${SLURM_JOB_NODELIST:-?}: ${launch[*]} $MILLIPEDE train $CONFIG $*"

# --signal=B:USR1@T sends USR1 to this shell only, and bash runs a trap only between
# commands: so the launcher runs in the background, `wait` returns when the trap has run,
# and the shell passes the signal on as USR1 (srun and mpirun forward it to every rank).
# SIGTERM is passed on as USR1 too (mpirun forwards USR1 but not TERM). The signal is sent
# again every 5 s until the launcher exits, because mpirun drops a signal that comes before
# its ranks exist (seen), and the first one waits until the launcher has run 5 s, because a
# rank that gets USR1 before its handler exists dies of it. A rank ignores repeats.
"${launch[@]}" "$MILLIPEDE" train "$CONFIG" "$@" &
child=$!
started=$SECONDS
sent=
while kill -0 "$child" 2>/dev/null; do
    if [ -z "$got" ]; then
        wait "$child"   # until the launcher exits or a trapped signal arrives
    else
        if [ $((SECONDS - started)) -ge 5 ] && [ $((SECONDS - ${sent:-0})) -ge 5 ]; then
            [ -z "$sent" ] && echo "== $(date -u +%FT%TZ) got SIG$got: asking the ranks to checkpoint and stop"
            kill -USR1 "$child" 2>/dev/null
            sent=$SECONDS
        fi
        sleep 0.5
    fi
done
wait "$child"
status=$?
trap - USR1 TERM

# SIGTERM is Slurm ending the job (scancel, the time limit, preemption; on preemption Slurm
# requeues by itself if so configured): the ranks have checkpointed, and a requeue here
# would undo a scancel. A new submission resumes from the checkpoint.
if [ "$status" -eq "$REQUEUE" ] && [ -n "$term" ]; then
    echo "== $(date -u +%FT%TZ) checkpointed (status $REQUEUE) after SIGTERM: not requeueing" \
         "(Slurm is ending job $SLURM_JOB_ID; submit again to resume)"
elif [ "$status" -eq "$REQUEUE" ]; then
    echo "== $(date -u +%FT%TZ) checkpointed (status $REQUEUE): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "== scontrol requeue failed: resubmit; training resumes from run.dir/checkpoints/latest"
fi
echo "== $(date -u +%FT%TZ) millipede exited with status $status"
exit "$status"
