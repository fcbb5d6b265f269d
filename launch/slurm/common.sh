# Shared by train.sbatch and sweep.sbatch, sourced once ROOT (the checkout) is known.
# Sets PYTHON, HEAD_NODE, PORT, CPUS, NPROC, OMP_NUM_THREADS and SRUN (an array), and
# stops the job with one line naming the fix when the interpreter or the allocation
# cannot work. Knobs (environment): SEGBENCH_PYTHON, SEGBENCH_RDZV_PORT,
# SEGBENCH_NPROC_PER_NODE.

segbench_die() {
  echo "segbench: error: $*" >&2
  exit 2
}

# The interpreter, named: an activated venv is not seen by a job submitted with
# --export=NONE (or by one whose nodes start a login shell).
if [ -n "${SEGBENCH_PYTHON:-}" ]; then
  PYTHON=$SEGBENCH_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PYTHON=$ROOT/.venv/bin/python
else
  PYTHON=$(command -v python3 || command -v python || true)
fi
[ -n "$PYTHON" ] || segbench_die "no python on PATH; set SEGBENCH_PYTHON=/path/to/venv/bin/python"
"$PYTHON" -c "import torch" >/dev/null 2>&1 \
  || segbench_die "$PYTHON cannot import torch; set SEGBENCH_PYTHON=/path/to/venv/bin/python" \
       "(sbatch --export=ALL,SEGBENCH_PYTHON=...) or create $ROOT/.venv"

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# One rendezvous port per job: two jobs whose first node is the same machine must not
# meet at one rendezvous (15000-29999: below Linux's ephemeral port range).
PORT=${SEGBENCH_RDZV_PORT:-$((15000 + SLURM_JOB_ID % 15000))}

# The job's CPUs per node; srun does not inherit --cpus-per-task on Slurm >= 22.05, so
# it is passed on explicitly (else core binding can leave a node's workers one core).
CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
GPUS=${SLURM_GPUS_ON_NODE:-0}
if [ -n "${SEGBENCH_NPROC_PER_NODE:-}" ]; then
  NPROC=$SEGBENCH_NPROC_PER_NODE
elif [ "$GPUS" -gt 0 ] 2>/dev/null; then
  NPROC=$GPUS  # one worker per GPU
else
  NPROC=1  # CPU-only node: one worker with all the job's cores (SEGBENCH_NPROC_PER_NODE for more)
fi
case $NPROC in '' | *[!0-9]* | 0) segbench_die "SEGBENCH_NPROC_PER_NODE=$NPROC: give a positive number of workers per node" ;; esac
OMP_NUM_THREADS=$((CPUS / NPROC))
if [ "$OMP_NUM_THREADS" -lt 1 ]; then
  echo "segbench: warning: $NPROC workers per node on $CPUS CPU(s): oversubscribed, 1 thread each" >&2
  OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

SRUN=(srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1
      --cpus-per-task="$CPUS")

# segbench_flag NAME DEFAULT ARGS...: the value of the last NAME VALUE or NAME=VALUE in
# ARGS (as argparse reads it), else DEFAULT.
segbench_flag() {
  local name=$1 value=$2
  shift 2
  while [ $# -gt 0 ]; do
    case $1 in
      "$name") [ $# -gt 1 ] && value=$2 ;;
      "$name"=*) value=${1#"$name"=} ;;
    esac
    shift
  done
  echo "$value"
}

# segbench_abs PATH: PATH under ROOT unless absolute (jobs run from ROOT).
segbench_abs() {
  case $1 in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac
}

# segbench_run LOGDIR CMD...: srun CMD on every node, each node's output in its own
# LOGDIR/node<N>.log; on failure, say so and show each node's error lines.
segbench_run() {
  local logdir=$1
  shift
  mkdir -p "$logdir"
  echo "segbench: job $SLURM_JOB_ID: $SLURM_NNODES node(s) x $NPROC worker(s) x" \
       "$OMP_NUM_THREADS thread(s), rendezvous $HEAD_NODE:$PORT, $PYTHON;" \
       "logs $logdir/node<N>.log"
  # A resubmitted job (a --resume) writes into the same folder: keep the earlier job's
  # node logs beside this one's.
  local f
  for f in "$logdir"/node*.log; do
    case $f in *.before-job*) continue ;; esac
    [ -f "$f" ] && mv "$f" "${f%.log}.before-job$SLURM_JOB_ID.log"
  done
  local rc=0 pid
  # srun in the background so that this shell can pass on the SIGTERM that Slurm sends
  # before a time limit or on scancel/preemption (#SBATCH --signal=B:TERM@60): the
  # workers then stop as on Ctrl-C, keep what they wrote, and say how to resume.
  "${SRUN[@]}" --output="$logdir/node%n.log" "$@" &
  pid=$!
  trap 'echo "segbench: job $SLURM_JOB_ID: SIGTERM (time limit, scancel or preemption): passing it on" >&2; kill -TERM "$pid" 2>/dev/null' TERM
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do  # wait returned for the signal: wait for srun
    rc=0
    wait "$pid" || rc=$?
  done
  trap - TERM
  if [ "$rc" -ne 0 ]; then
    echo "segbench: job $SLURM_JOB_ID failed (exit $rc); each node's errors:" >&2
    for f in "$logdir"/node*.log; do
      [ -f "$f" ] || continue
      echo "== $f" >&2
      # the workers' one-line "error:" reports, else the log's last lines
      grep -m 5 "error: " "$f" >&2 || tail -n 5 "$f" >&2
    done
  fi
  return "$rc"
}
