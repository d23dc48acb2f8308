"""Run by tests/test_loss.py under torchrun (2 ranks): the chunked loss under FSDP2 equals the plain one.

Each rank builds the same random tiny Llama (tied and untied embeddings), shards it as the recipe does
(recipes_core.distributed.shard_model), and computes the loss and gradients of its own batch with the plain
loss and with the chunked one. Rank 0 writes the largest relative differences (loss, gradients gathered
with full_tensor) as JSON to the path given as the first argument."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM

from recipes_core import IGNORE_INDEX
from recipes_core import distributed as D
from recipes_core.finetune import token_loss_sum
from recipes_core.tiny import tiny_llama_config


def loss_and_grads(model, batch, env, chunk_size: int):
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, batch, env.device, chunk_size)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total), {n: p.grad.full_tensor() for n, p in model.named_parameters()}


def main(env: D.DistEnv, out: str) -> None:
    result = {}
    for tied in (False, True):
        torch.manual_seed(0)  # the same weights on every rank
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=300, tie_word_embeddings=tied))
        mesh = D.build_mesh(env, "full")
        D.shard_model(model, mesh, D.mixed_precision_policy("fp32", env.device)[0])
        g = torch.Generator().manual_seed(1 + env.rank)  # each rank its own batch
        ids = torch.randint(0, 300, (2, 40), generator=g)
        labels = ids.clone()
        labels[:, :9] = IGNORE_INDEX  # a prompt: chunks with nothing supervised too
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        plain, plain_grads = loss_and_grads(model, batch, env, 0)
        chunked, chunked_grads = loss_and_grads(model, batch, env, 7)  # 80 tokens: 11 uneven chunks
        grad_error = max(float((chunked_grads[n] - g).norm() / g.norm()) for n, g in plain_grads.items())
        result["tied" if tied else "untied"] = {"plain": plain, "chunked": chunked,
                                                 "loss_rel": abs(chunked - plain) / abs(plain),
                                                 "grad_rel": grad_error, "n_grads": len(plain_grads)}
    if env.is_main:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    with D.process_group("gloo") as env:
        main(env, sys.argv[1])
