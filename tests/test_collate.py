"""Padding and packing produce the same per-sample losses as running each sample alone."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from recipes_core import IGNORE_INDEX
from recipes_core.collate import pack_examples, packed_collate, pad_collate
from recipes_core.data import load_records
from recipes_core.preprocess import tokenize_records

from conftest import DATA_DIR


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting labels[t+1] from position t (0 where ignored)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")


def sample_loss(logits, labels) -> float:
    losses = token_losses(logits, labels)
    return (losses.sum() / (labels[:, 1:] != IGNORE_INDEX).sum()).item()


def examples(tokenizer, n=6):
    records = load_records(DATA_DIR / "alpaca_train.jsonl", "alpaca").select(range(n))
    return tokenize_records(records, "alpaca", tokenizer, train_on_inputs=True)


@pytest.mark.parametrize("strategy", ["in_order", "first_fit_decreasing"])
def test_packed_block_losses_equal_samples_run_alone(tiny_models, instruct_tokenizer, strategy):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["instruct"]).eval()
    items = examples(instruct_tokenizer)
    block_size = sum(len(e["input_ids"]) for e in items[:3]) + 5  # three samples and a pad tail
    blocks = pack_examples(items, block_size, instruct_tokenizer.pad_token_id, strategy=strategy)
    if strategy == "in_order":
        assert len(blocks) >= 2 and blocks[0]["sample_lengths"] == [len(e["input_ids"]) for e in items[:3]]
    order = member_indices(items, blocks)  # which example sits where
    batch = packed_collate(blocks)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    sample = 0
    for row, block in enumerate(blocks):
        start = 0
        for length in block["sample_lengths"]:
            alone = torch.tensor([items[order[sample]]["input_ids"]])
            labels = torch.tensor([items[order[sample]]["labels"]])
            with torch.no_grad():
                alone_logits = model(input_ids=alone).logits
            packed = packed_logits[row: row + 1, start: start + length]
            assert abs(sample_loss(packed, labels) - sample_loss(alone_logits, labels)) < 1e-5
            torch.testing.assert_close(packed, alone_logits, atol=1e-5, rtol=0)
            start += length
            sample += 1
    assert sample == len(items)


def member_indices(items: list[dict], blocks: list[dict]) -> list[int]:
    """The index in `items` of every sample of every block, in block order; checks each sample's tokens,
    labels (first one ignored) and restarting positions, and that the rest of a block is a pad tail."""
    unused = list(range(len(items)))
    found = []
    for block in blocks:
        start = 0
        for length in block["sample_lengths"]:
            ids = block["input_ids"][start:start + length]
            i = next(k for k in unused if list(items[k]["input_ids"]) == ids)
            unused.remove(i)
            assert block["labels"][start:start + length] == [IGNORE_INDEX] + list(items[i]["labels"][1:])
            assert block["position_ids"][start:start + length] == list(range(length))
            found.append(i)
            start += length
        assert set(block["labels"][start:]) <= {IGNORE_INDEX}
        assert block["position_ids"][start:] == list(range(len(block["input_ids"]) - start))
    return found


def long_tailed_lengths(n: int = 600, seed: int = 0) -> list[int]:
    """Alpaca-like token lengths: a prompt of 40-70 tokens and a log-normal answer, capped at 256."""
    rng = random.Random(seed)
    return [min(256, rng.randint(40, 70) + int(rng.lognormvariate(3.0, 1.0))) for _ in range(n)]


def test_first_fit_decreasing_fills_blocks_at_least_as_well_and_keeps_every_example_once():
    lengths = long_tailed_lengths()
    block = 256
    items, offset = [], 0
    for n in lengths:  # distinct tokens per example, so each one can be found again
        items.append({"input_ids": list(range(offset, offset + n)), "labels": list(range(offset, offset + n))})
        offset += n
    fill = {}
    for strategy in ("in_order", "first_fit_decreasing"):
        blocks = pack_examples(items, block, pad_token_id=-1, strategy=strategy)
        assert all(len(b["input_ids"]) == block == len(b["labels"]) == len(b["position_ids"]) for b in blocks)
        assert sorted(member_indices(items, blocks)) == list(range(len(items)))  # each exactly once, whole
        fill[strategy] = sum(lengths) / (len(blocks) * block)
        assert blocks == pack_examples(items, block, pad_token_id=-1, strategy=strategy)  # deterministic
    assert fill["first_fit_decreasing"] >= fill["in_order"]
    assert fill["first_fit_decreasing"] > 0.9  # FFD's worst case is 11/9 OPT + 1; here it is near full


def test_packing_refuses_an_example_longer_than_the_block():
    with pytest.raises(ValueError, match="more than block_size"):
        pack_examples([{"input_ids": [1] * 9, "labels": [1] * 9}], 8, 0)
    with pytest.raises(ValueError, match="strategy"):
        pack_examples([{"input_ids": [1], "labels": [1]}], 8, 0, strategy="best")


def test_packing_without_position_reset_would_leak_attention(tiny_models, instruct_tokenizer):
    """The control: the same block under a plain causal mask attends across samples, so logits differ."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["instruct"]).eval()
    items = examples(instruct_tokenizer, 2)
    block = pack_examples(items, sum(len(e["input_ids"]) for e in items), instruct_tokenizer.pad_token_id,
                          strategy="in_order")[0]
    ids = torch.tensor([block["input_ids"]])
    second = slice(len(items[0]["input_ids"]), None)
    with torch.no_grad():
        leaky = model(input_ids=ids).logits[:, second]
        alone = model(input_ids=torch.tensor([items[1]["input_ids"]])).logits
    assert (leaky - alone).abs().max() > 1e-3


def test_pad_collate_masks_padding(instruct_tokenizer):
    items = examples(instruct_tokenizer, 4)
    batch = pad_collate(items, instruct_tokenizer.pad_token_id)
    longest = max(len(e["input_ids"]) for e in items)
    assert batch["input_ids"].shape == (4, longest)
    for row, e in enumerate(items):
        n = len(e["input_ids"])
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == instruct_tokenizer.pad_token_id).all()


def test_padded_batch_losses_equal_samples_run_alone(tiny_models, instruct_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["instruct"]).eval()
    items = examples(instruct_tokenizer, 3)
    batch = pad_collate(items, instruct_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, e in enumerate(items):
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits
            n = len(e["input_ids"])
            torch.testing.assert_close(logits[row: row + 1, :n], alone, atol=1e-5, rtol=0)
