"""Run by tests/test_finetune.py under torchrun (2 ranks): fsdp.gather_once_per_step trains the same
numbers with fewer collectives.

Each rank builds the same random tiny Llama (4 decoder layers), shards it as the recipe does
(recipes_core.distributed.shard_model) with gather_once_per_step off, then on, and runs 3 optimizer steps of
finetune.train_step (accumulation 2, clipping, fused AdamW) on the same micro-batches at every step. The second step's
collectives are counted with recipes_core.profiling.count_collectives. Rank 0 writes, per setting, the
losses, gradient norms, the final weights' checksum and the counts as JSON to the path in argv[1]."""

from __future__ import annotations

import json
import sys

import torch
from transformers import LlamaForCausalLM

from recipes_core import IGNORE_INDEX
from recipes_core import distributed as D
from recipes_core.finetune import train_step
from recipes_core.profiling import count_collectives
from recipes_core.tiny import tiny_llama_config

ACCUM, STEPS = 2, 3


def micro_batches(rank: int) -> list[dict]:
    """This rank's micro-batches, the same at every step (so the loss falls)."""
    batches = []
    for i in range(ACCUM):
        g = torch.Generator().manual_seed(10 * rank + i)  # each rank and micro-batch its own
        ids = torch.randint(0, 300, (2, 24), generator=g)
        labels = ids.clone()
        labels[:, :5] = IGNORE_INDEX  # a prompt
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return batches


def run(env: D.DistEnv, once: bool, reduce_every: bool = False) -> dict:
    torch.manual_seed(0)  # the same weights on every rank and in both settings
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=300))
    D.shard_model(model, D.build_mesh(env, "full"), D.mixed_precision_policy("fp32", env.device)[0],
                  gather_once_per_step=once)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True)
    losses, norms, counted = [], [], None
    for step in range(STEPS):
        if step == 1:
            with count_collectives() as counted:
                result = train_step(model, micro_batches(env.rank), optimizer, None, env, 1.0,
                                    gather_once_per_step=once, reduce_every_micro_batch=reduce_every)
        else:
            result = train_step(model, micro_batches(env.rank), optimizer, None, env, 1.0,
                                gather_once_per_step=once, reduce_every_micro_batch=reduce_every)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    weights = [p.full_tensor() for p in model.parameters()]
    return {"losses": losses, "grad_norms": norms, "calls": counted.calls,
            "weights_sum": float(sum(w.double().abs().sum() for w in weights)),
            "weights": [w.flatten()[:64].tolist() for w in weights], "layers": model.config.num_hidden_layers}


def main(env: D.DistEnv, out: str) -> None:
    result = {"off": run(env, False), "on": run(env, True), "reduce_every": run(env, False, True)}
    if env.is_main:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    with D.process_group("gloo") as env:
        main(env, sys.argv[1])
