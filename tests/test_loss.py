"""Chunked cross-entropy (recipes_core.loss) equals the plain loss: loss and gradients, fp32, within 1e-6
relative, unsharded and under FSDP2 on 2 ranks, with tied and untied embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from recipes_core import IGNORE_INDEX
from recipes_core.finetune import token_loss_sum
from recipes_core.launch import run_script
from recipes_core.tiny import tiny_llama_config

TOLERANCE = 1e-6


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (3, 33), generator=g)
    labels = ids.clone()
    labels[0, :10] = IGNORE_INDEX  # a prompt
    labels[2, 20:] = IGNORE_INDEX  # padding
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _loss_and_grads(model, batch, chunk_size):
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, batch, torch.device("cpu"), chunk_size)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_chunked_loss_equals_plain_loss(tied, chunk_size):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=300, tie_word_embeddings=tied))
    batch = _batch()
    plain, plain_grads = _loss_and_grads(model, batch, 0)
    chunked, chunked_grads = _loss_and_grads(model, batch, chunk_size)  # 99 tokens: uneven chunks
    assert abs(float(chunked - plain)) <= TOLERANCE * abs(float(plain))
    assert plain_grads.keys() == chunked_grads.keys()
    for name, grad in plain_grads.items():
        assert float((chunked_grads[name] - grad).norm()) <= TOLERANCE * float(grad.norm()), name
    with torch.no_grad():  # evaluation path (no checkpointing)
        evaluated = token_loss_sum(model, batch, torch.device("cpu"), chunk_size)
        assert abs(float(evaluated - plain)) <= TOLERANCE * abs(float(plain))


def test_chunked_loss_under_fsdp_two_ranks(tmp_path):
    out = tmp_path / "loss.json"
    run_script(Path(__file__).with_name("loss_ranks.py"), [str(out)], nproc=2, log=tmp_path / "log.txt")
    result = json.loads(out.read_text())
    for kind in ("untied", "tied"):
        r = result[kind]
        assert r["loss_rel"] <= TOLERANCE, (kind, r)
        assert r["grad_rel"] <= TOLERANCE, (kind, r)
