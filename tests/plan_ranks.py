"""Run by tests/test_plan.py under torchrun (1, 2 or 4 ranks): a real fine-tune with the recipe
(recipes_core.finetune.run) whose metrics.jsonl gives, per rank, what the planner is checked against:
`memory_before_model_bytes_per_rank` (start record: RSS just before the model is built: Python, torch,
transformers, datasets, gloo, the tokenized data; the planner's runtime, not its prediction) and
`peak_memory_bytes_per_rank` (last train record: ru_maxrss, rank 0's load included). Rank 0 writes
{baseline, peak} per rank as JSON to argv[1]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from recipes_core.config import load_config
from recipes_core.distributed import process_group
from recipes_core.finetune import run


def main(env, out: str, model_dir: str, run_dir: str, seq: int, accum: int = 1, *extra: str) -> None:
    cfg = load_config("cookbook/tiny_full.yaml", [
        "model.source=hf", f"model.path={model_dir}", "data.packing=true", f"data.max_seq_len={seq}",
        "data.max_train_examples=200", "data.max_eval_examples=2", "train.micro_batch_size=1",
        f"train.grad_accum_steps={accum}", "train.max_steps=2", "train.eval_every=0", "fsdp.mixed_precision=fp32",
        f"checkpoint.output_dir={run_dir}", "checkpoint.save_final=false", "checkpoint.save_every=0",
        "log.progress_bar=false", "log.tensorboard=false", "log.peak_flops=1e12", *extra])
    run(cfg)  # 2 steps: the second runs with the AdamW moments the first step allocated (the planner's case)
    if env.is_main:
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        start = next(r for r in records if r["kind"] == "start")
        peaks = [r for r in records if r["kind"] == "train"][-1]["peak_memory_bytes_per_rank"]
        Path(out).write_text(json.dumps({"baseline": start["memory_before_model_bytes_per_rank"], "peak": peaks,
                                         "chunk": cfg.train.loss_chunk_size}))


if __name__ == "__main__":
    with process_group("gloo") as env:
        main(env, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 1, *sys.argv[6:])
