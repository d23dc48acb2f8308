"""Chunked cross-entropy: the loss of a causal LM without the whole (tokens x vocab) logits tensor in memory.

The plain loss computes logits for every token at once: B x T x vocab floats (SmolLM2, 2048 tokens, 49k
vocab: 403 MB in fp32), then log-softmax (as much again, kept for backward) and, in backward, their
gradients. For a large vocabulary that is often the largest single item of a step. Here the model body
runs as usual up to the final norm, and the lm_head and the cross-entropy run on `chunk_size` tokens at a
time; each chunk is wrapped in torch.utils.checkpoint, so its logits are freed as soon as its loss is
summed and recomputed in backward, one chunk at a time. The cost: the lm_head matmul runs twice (forward
and again in backward), e.g. +2 x tokens x hidden x vocab FLOPs per micro-batch.

Same numbers as the plain loss up to summation order (tests/test_loss.py: loss and every gradient within
1e-6 relative in fp32, unsharded and under FSDP2 on 2 ranks, tied and untied embeddings).

Why the whole model is called, and not `model.model(...)` then `model.lm_head`: under FSDP2
(recipes_core.distributed.shard_model) the embeddings, final norm and lm_head belong to the root module's
parameter group, which is all-gathered by the root's forward hooks. Calling the body alone would skip them
(the embedding would see its sharded DTensor weight). So the root is called with `logits_to_keep` set to
an empty index (the lm_head runs on zero positions), a forward hook on the body catches its output (the
final norm's hidden states), and the lm_head weight is used as FSDP left it after the root forward: the
root is never resharded between forward and backward, so it is the gathered weight, and its gradient
reaches FSDP's reduce-scatter like any other (tied embeddings: the same parameter, both gradients add up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recipes_core import IGNORE_INDEX


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Token t predicts label t+1: labels shifted left, the last position padded with IGNORE_INDEX."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    if logits.dtype != torch.float32:  # bf16 logits are upcast for an exact loss, as in the plain loss
        logits = logits.float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def final_hidden_states(model, inputs: dict) -> torch.Tensor:
    """The body's output (after the final norm), computed through the whole model's forward so that
    FSDP's root hooks run, with the lm_head applied to no position at all."""
    body = model.get_decoder()
    caught = []
    handle = body.register_forward_hook(lambda module, args, output: caught.append(output.last_hidden_state))
    try:
        no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**inputs, use_cache=False, logits_to_keep=no_position)
    finally:
        handle.remove()
    return caught[-1]


def chunked_token_loss_sum(model, inputs: dict, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Sum of the cross-entropy over the supervised tokens (labels unshifted, as in the batch), computed
    `chunk_size` tokens at a time; equal to the plain loss up to summation order."""
    hidden = final_hidden_states(model, inputs).flatten(0, 1)
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("chunked loss: an lm_head with a bias is not supported; set train.loss_chunk_size=0")
    targets = shifted_labels(labels).flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        # Every chunk, also one with nothing supervised: skipping it would leave the lm_head without a
        # gradient on this rank only, and FSDP's reduce-scatter must see the same tensors on every rank.
        part = slice(start, start + chunk_size)
        if torch.is_grad_enabled():  # keep no logits for backward: recompute this chunk's there
            total = total + checkpoint(_chunk_loss, hidden[part], head.weight, targets[part], use_reentrant=False)
        else:
            total = total + _chunk_loss(hidden[part], head.weight, targets[part])
    return total
