#!/usr/bin/env bash
# Fine-tune on one machine: one process per GPU, or NPROC CPU processes where there is no GPU.
#
#   cookbook/launch_single_node.sh cookbook/tiny_full.yaml [key=value ...]
#   NPROC=4 cookbook/launch_single_node.sh cookbook/tiny_hsdp.yaml
#
# Rerunning the same command with checkpoint.resume=auto continues from the last complete checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${1:?usage: $0 CONFIG.yaml [key=value ...]}
shift
PYTHON=${PYTHON:-.venv/bin/python}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# On CPU each rank gets an equal share of the cores; without this every rank starts one thread per
# core and they fight over them.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  CORES=$(nproc)
  export OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
fi
export TOKENIZERS_PARALLELISM=false
# Memory allocator: recipes_core.launch below preloads mimalloc into the ranks (fast, per-rank memory that
# follows the FSDP arithmetic; RECIPES_ALLOCATOR=glibc keeps glibc). Where glibc's malloc is used, this
# threshold makes blocks above 128 KiB go back to the OS when freed: with glibc's default FSDP's freed
# all-gather buffers stay resident, and on CPU the per-rank memory hardly falls with more ranks
# (benchmarks/RESULTS.md, memory scaling; recipes_core/launch.py).
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072}

# recipes_core.launch is torchrun (same arguments) that exits 2, without its own traceback, on bad input
exec "$PYTHON" -m recipes_core.launch --standalone --nproc_per_node "$NPROC" \
  -m recipes_core.finetune --config "$CONFIG" "$@"
