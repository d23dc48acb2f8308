"""Batching: dynamic padding, or packing into fixed-length blocks with no attention across samples.

Padding: each batch is padded to its longest example; pad labels are IGNORE_INDEX and the attention
mask hides the pads.

Packing: examples are laid end to end in blocks of `block_size` tokens. Position ids restart at 0 for
every example (so rotary embeddings see the positions each sample would have alone), and the attention
mask is an explicit 4-D boolean block-diagonal causal mask (batch, 1, T, T): a token attends only to
earlier tokens of its own sample. Hugging Face models take such a 4-D mask as is with the default
`sdpa` attention. (Relying on position ids alone is fragile: transformers only infers the packing when
no attention mask and no KV cache are passed, and a model in eval mode creates a cache by default.)
The test suite checks that per-sample losses of a packed block equal the samples run one by one.
"""

from __future__ import annotations

import torch

from recipes_core import IGNORE_INDEX


def pad_collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids, labels, attention_mask = [], [], []
    for e in examples:
        n_pad = longest - len(e["input_ids"])
        input_ids.append(list(e["input_ids"]) + [pad_token_id] * n_pad)
        labels.append(list(e["labels"]) + [IGNORE_INDEX] * n_pad)
        attention_mask.append([1] * len(e["input_ids"]) + [0] * n_pad)
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention_mask)}


def pack_examples(examples: list[dict], block_size: int, pad_token_id: int) -> list[dict]:
    """Greedy first-fit in order: an example that does not fit in the current block starts the next.
    Examples longer than the block are an error (truncate them first with max_seq_len)."""
    blocks: list[dict] = []
    current = {"input_ids": [], "labels": [], "position_ids": [], "sample_lengths": []}

    def close():
        n_pad = block_size - len(current["input_ids"])
        if n_pad:
            # The pad tail is its own "sample": positions restart, labels ignored.
            current["input_ids"] += [pad_token_id] * n_pad
            current["labels"] += [IGNORE_INDEX] * n_pad
            current["position_ids"] += list(range(n_pad))
        blocks.append(current)

    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if n > block_size:
            raise ValueError(f"example {i} has {n} tokens, more than block_size={block_size}; "
                             "set max_seq_len <= block_size")
        if len(current["input_ids"]) + n > block_size:
            close()
            current = {"input_ids": [], "labels": [], "position_ids": [], "sample_lengths": []}
        labels = list(e["labels"])
        labels[0] = IGNORE_INDEX  # the previous sample's last token must not learn to predict this one
        current["input_ids"] += list(e["input_ids"])
        current["labels"] += labels
        current["position_ids"] += list(range(n))
        current["sample_lengths"].append(n)
    if current["input_ids"]:
        close()
    return blocks


def block_diagonal_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, T) position ids that restart per sample -> (batch, 1, T, T) bool mask, True = may attend."""
    sample_index = (position_ids == 0).cumsum(dim=-1)  # which sample each token belongs to
    same_sample = sample_index.unsqueeze(-1) == sample_index.unsqueeze(-2)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (same_sample & causal).unsqueeze(1)


def packed_collate(blocks: list[dict]) -> dict[str, torch.Tensor]:
    batch = {key: torch.tensor([b[key] for b in blocks]) for key in ("input_ids", "labels", "position_ids")}
    batch["attention_mask"] = block_diagonal_causal_mask(batch["position_ids"])
    return batch
