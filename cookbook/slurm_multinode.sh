#!/usr/bin/env bash
# Fine-tune on several nodes with SLURM: one torchrun per node, one process per GPU, the c10d
# rendezvous on the first node. HSDP (fsdp.sharding=hybrid) keeps parameter all-gathers inside a node.
#
#   sbatch --nodes 4 cookbook/slurm_multinode.sh cookbook/smollm2_full.yaml fsdp.sharding=hybrid
#
# A job cut by the time limit is resumed by submitting it again (checkpoint.resume=auto below); with
# --signal, train.stop_after_steps can also end a run cleanly before the limit.
#SBATCH --job-name=llama-finetune
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch $0 CONFIG.yaml [key=value ...]}
shift
PYTHON=${PYTHON:-.venv/bin/python}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
# sed, not head: head exits after one line and, with pipefail, a SIGPIPE in scontrol would end the job
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
PORT=${MASTER_PORT:-29500}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # stage models and data on shared storage beforehand
# glibc malloc: allocations above 128 KiB go back to the OS when freed, so on CPU nodes FSDP's freed
# all-gather buffers do not stay resident in malloc's arenas (an allocator setting; see launch_single_node.sh).
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072}
# NCCL over InfiniBand: uncomment and set for your fabric if the defaults pick the wrong interface.
# export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5

srun "$PYTHON" -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$PORT" \
  -m recipes_core.finetune --config "$CONFIG" checkpoint.resume=auto "$@"
