# Sourced by every sbatch script: project root, Python environment, W&B grouping, logging.
# Settings come from the environment of `sbatch` (exported by default) or slurm/submit.py:
#   PIPELINE_ROOT    repository root (default: the submission directory)
#   PIPELINE_PYTHON  interpreter with the package installed (default: $PIPELINE_ROOT/.venv/bin/python)
#   SWEEP            W&B group for every run of this submission (default: the job name)
set -euo pipefail
PIPELINE_ROOT="${PIPELINE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$PIPELINE_ROOT"
PY="${PIPELINE_PYTHON:-$PIPELINE_ROOT/.venv/bin/python}"
export PYTHONUNBUFFERED=1
export WANDB_RUN_GROUP="${SWEEP:-${SLURM_JOB_NAME:-pipeline}}"
export WANDB_MODE="${WANDB_MODE:-offline}"
# one job = one set of cores; do not oversubscribe them with BLAS threads
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} task ${SLURM_ARRAY_TASK_ID:--} on $(hostname) restart ${SLURM_RESTART_COUNT:-0}"
