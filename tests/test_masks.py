"""The supervised tokens of every format decode to exactly the answer plus its end token."""

from __future__ import annotations

import json

import pytest

from recipes_core import IGNORE_INDEX
from recipes_core.data import load_records
from recipes_core.preprocess import (CLASSIFICATION_LABEL_WORDS, tokenize_alpaca, tokenize_chat,
                                     tokenize_classification)

from conftest import DATA_DIR


def supervised_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])


def first_rows(name: str, fmt: str, n: int = 40):
    return load_records(DATA_DIR / name, fmt).select(range(n))


@pytest.mark.parametrize("tokenizer_name", ["base_tokenizer", "instruct_tokenizer"])
def test_alpaca_supervises_answer_and_eos_only(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    for record in first_rows("alpaca_train.jsonl", "alpaca"):
        example = tokenize_alpaca(record, tokenizer)
        assert supervised_text(example, tokenizer) == record["output"] + tokenizer.eos_token
        assert len(example["input_ids"]) == len(example["labels"])
        assert all(l == IGNORE_INDEX or l == t for t, l in zip(example["input_ids"], example["labels"]))


def test_alpaca_without_input_uses_short_template(instruct_tokenizer):
    example = tokenize_alpaca({"instruction": "Say hi.", "input": "", "output": "hi"}, instruct_tokenizer)
    assert "### Input" not in instruct_tokenizer.decode(example["input_ids"])
    assert supervised_text(example, instruct_tokenizer) == "hi<|eot_id|>"


def test_classification_masks_inputs_unless_train_on_inputs(base_tokenizer):
    for record in first_rows("pawsx_train.jsonl", "classification", 20):
        masked = tokenize_classification(record, base_tokenizer)
        word = CLASSIFICATION_LABEL_WORDS[record["label"]]
        assert supervised_text(masked, base_tokenizer) == word + base_tokenizer.eos_token
        everything = tokenize_classification(record, base_tokenizer, train_on_inputs=True)
        assert everything["input_ids"] == masked["input_ids"]
        # all but bos (which nothing precedes) is supervised
        assert everything["labels"][0] == IGNORE_INDEX
        assert everything["labels"][1:] == everything["input_ids"][1:]


def _assistant_texts(record, end_token):
    return [m["content"] + end_token for m in record["messages"] if m["role"] == "assistant"]


def _supervised_runs(example, tokenizer) -> list[str]:
    """Decode each contiguous run of supervised tokens separately."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_chat_llama3_template_supervises_assistant_turns_only(instruct_tokenizer):
    for record in first_rows("chat_train.jsonl", "chat"):
        example = tokenize_chat(record, instruct_tokenizer)
        assert _supervised_runs(example, instruct_tokenizer) == _assistant_texts(record, "<|eot_id|>")
        # the role header before each answer is masked
        text = instruct_tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"])
                                          if l == IGNORE_INDEX])
        assert "assistant<|end_header_id|>" in text


def test_chat_chatml_template_of_smollm2(smollm2_tokenizer):
    for record in first_rows("chat_train.jsonl", "chat", 20):
        example = tokenize_chat(record, smollm2_tokenizer)
        assert _supervised_runs(example, smollm2_tokenizer) == _assistant_texts(record, "<|im_end|>")


def test_chat_without_template_is_a_clear_error(base_tokenizer):
    record = json.loads((DATA_DIR / "chat_train.jsonl").read_text().splitlines()[0])
    with pytest.raises(ValueError, match="no chat_template"):
        tokenize_chat(record, base_tokenizer)


def test_truncation_is_flagged(instruct_tokenizer):
    record = first_rows("alpaca_train.jsonl", "alpaca", 1)[0]
    example = tokenize_alpaca(record, instruct_tokenizer, max_seq_len=10)
    assert example["truncated"] and len(example["input_ids"]) == 10
    assert all(l == IGNORE_INDEX for l in example["labels"])  # the answer was cut away
