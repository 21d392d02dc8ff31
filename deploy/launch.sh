#!/usr/bin/env bash
# One trainer launch for one machine of a job on any cluster: `deploy/launch.sh [trainer flags...]`.
#
# It finds how many machines the job has, which one this is and where the first one listens, from whatever
# scheduler started it, and runs `accelerate launch ... -m trainer` with one process per GPU of this machine.
# Every machine of the job runs the same command. Read, first found wins:
#   machines:      NUM_MACHINES, SLURM_NNODES, PET_NNODES (Kubeflow), WORLD_SIZE without LOCAL_RANK (below); 1
#   this machine:  MACHINE_RANK, SLURM_NODEID, PET_NODE_RANK, JOB_COMPLETION_INDEX (indexed Job, JobSet),
#                  RANK without LOCAL_RANK (below); 0
#   head address:  MASTER_ADDR (Kubeflow, torchrun), the first host of SLURM_JOB_NODELIST; 127.0.0.1
#   head port:     MASTER_PORT; 29500
#   GPUs here:     GPUS_PER_NODE, else the GPUs nvidia-smi lists, else 1 (a CPU machine: set GPUS_PER_NODE for
#                  several CPU processes)
#
# The trainer's own run.mixed_precision sets the precision (accelerate launch's flag is only its default).
#
# Kubeflow's PyTorchJob sets RANK and WORLD_SIZE per pod, that is per machine, not per process: a launcher that
# took them for process ranks would start one process per pod. Without LOCAL_RANK (which only a process
# launcher sets) they are read here as the machine's rank and the machine count, and then unset, so that the
# processes accelerate starts get their own.
set -euo pipefail

if [[ -z "${LOCAL_RANK:-}" && -n "${RANK:-}" && -n "${WORLD_SIZE:-}" ]]; then
  POD_RANK=$RANK POD_COUNT=$WORLD_SIZE
  unset RANK WORLD_SIZE
fi
machines=${NUM_MACHINES:-${SLURM_NNODES:-${PET_NNODES:-${POD_COUNT:-1}}}}
machine_rank=${MACHINE_RANK:-${SLURM_NODEID:-${PET_NODE_RANK:-${JOB_COMPLETION_INDEX:-${POD_RANK:-0}}}}}
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
head_addr=${MASTER_ADDR:-127.0.0.1}
head_port=${MASTER_PORT:-29500}
if [[ -n "${GPUS_PER_NODE:-}" ]]; then
  per_machine=$GPUS_PER_NODE
elif command -v nvidia-smi >/dev/null 2>&1; then
  per_machine=$(nvidia-smi -L | wc -l)
else
  per_machine=1
fi

if (( machines * per_machine == 1 )); then
  exec python -m trainer "$@"
fi
echo "deploy/launch.sh: machine ${machine_rank} of ${machines}, ${per_machine} process(es) here, head ${head_addr}:${head_port}" >&2
exec accelerate launch \
  --multi_gpu \
  --num_machines "$machines" \
  --machine_rank "$machine_rank" \
  --main_process_ip "$head_addr" \
  --main_process_port "$head_port" \
  --num_processes $((machines * per_machine)) \
  --mixed_precision no \
  --dynamo_backend no \
  -m trainer "$@"
