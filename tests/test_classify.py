"""Label-token scoring (recipes_core.classify) on the real tiny model: the prompt is the one training
supervises, the scores are the next-token logits a plain unpadded forward gives, and label words whose
first tokens are not distinct are refused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes_core import IGNORE_INDEX
from recipes_core.classify import classify, label_token_ids, prompt_ids
from recipes_core.preprocess import CLASSIFICATION_LABEL_WORDS, classification_prompt, tokenize_classification

from conftest import DATA_DIR


@pytest.fixture(scope="module")
def model(tiny_models):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"]), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def records():
    with open(DATA_DIR / "pawsx_eval.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f][:12]


def by_hand(model, tokenizer, record) -> torch.Tensor:
    """The log-probabilities of " no" and " yes" (first tokens) after the prompt: one unpadded forward."""
    ids = [tokenizer.bos_token_id] + tokenizer.encode(classification_prompt(record), add_special_tokens=False)
    no, yes = (tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word)[0]) for word in CLASSIFICATION_LABEL_WORDS)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits, dim=-1)[[no, yes]]


def test_scores_are_the_label_logits_after_the_prompt(model, instruct_tokenizer, records):
    result = classify(model, instruct_tokenizer, records, batch_size=5)  # ragged, left-padded batches
    expected = torch.stack([by_hand(model, instruct_tokenizer, r) for r in records])
    assert len({len(prompt_ids(r, instruct_tokenizer)) for r in records}) > 1, "the batches must need padding"
    torch.testing.assert_close(result.scores, expected, atol=1e-4, rtol=1e-4)
    decided = (expected[:, 1] - expected[:, 0]).abs() > 1e-3
    assert decided.sum() >= len(records) // 2
    assert [p for p, d in zip(result.predictions, decided) if d] == expected.argmax(1)[decided].tolist()
    gold = [r["label"] for r in records]
    assert result.accuracy == pytest.approx(sum(g == p for g, p in zip(gold, result.predictions)) / len(records))


def test_flipped_labels_flip_the_accuracy(model, instruct_tokenizer, records):
    result = classify(model, instruct_tokenizer, records)
    flipped = classify(model, instruct_tokenizer, [{**r, "label": 1 - r["label"]} for r in records])
    assert flipped.predictions == result.predictions, "the gold label must not leak into the prompt"
    assert flipped.accuracy == pytest.approx(1 - result.accuracy)


def test_the_prompt_is_what_training_supervises_the_label_after(instruct_tokenizer, records):
    ids = label_token_ids(instruct_tokenizer)
    for record in records:
        example = tokenize_classification(record, instruct_tokenizer)
        prompt = prompt_ids(record, instruct_tokenizer)
        label_position = len(prompt)
        assert example["input_ids"][:label_position] == prompt
        assert example["input_ids"][label_position] == ids[record["label"]]
        assert example["input_ids"][-1] == instruct_tokenizer.eos_token_id
        assert example["labels"][label_position] == ids[record["label"]]
        assert set(example["labels"][:label_position]) == {IGNORE_INDEX}


def test_label_words_are_scored_by_distinct_first_tokens(model, instruct_tokenizer, records):
    # The tiny tokenizer splits " yes" into " y" + "es": the first piece stands for the word.
    first = [instruct_tokenizer.encode(w, add_special_tokens=False)[0] for w in CLASSIFICATION_LABEL_WORDS]
    assert label_token_ids(instruct_tokenizer) == first and len(set(first)) == 2
    with pytest.raises(ValueError, match="start with the same token"):
        classify(model, instruct_tokenizer, records, label_words=(" y", " yes"))
    with pytest.raises(ValueError, match="start with the same token"):
        label_token_ids(instruct_tokenizer, (" no", " no"))
    with pytest.raises(ValueError, match="no token"):
        label_token_ids(instruct_tokenizer, ("", " yes"))


def test_custom_prompt_and_label_words_go_through_the_recipe_and_classify(model, instruct_tokenizer, tmp_path):
    """Your own task: data.classification_prompt and data.label_words reach the recipe's tokenization
    (recipes_core.finetune.tokenized, what training reads) and classify scores the same prompt and words."""
    from recipes_core.config import ConfigError, load_config
    from recipes_core.data import DataFormatError
    from recipes_core.finetune import tokenized

    prompt = "Review: {sentence1}\nVerdict:"
    words = [" negative", " no", " positive"]  # three labels; " positive" is one tiny token, " no" too
    rows = [{"sentence1": "the soup was bland", "sentence2": "-", "label": 0},
            {"sentence1": "the soup was fine i guess", "sentence2": "-", "label": 1},
            {"sentence1": "the staff were lovely", "sentence2": "-", "label": 2}]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["data.format=classification", f"data.train_path={path}", f"data.classification_prompt={prompt}",
                 f"data.label_words={json.dumps(words)}"]
    cfg = load_config(None, overrides)
    assert cfg.data.label_words == words and cfg.data.classification_prompt == prompt

    examples = tokenized(str(path), cfg, instruct_tokenizer, limit=0)
    first_tokens = label_token_ids(instruct_tokenizer, words)
    for row, example in zip(rows, examples):
        ids = prompt_ids(row, instruct_tokenizer, prompt)
        assert instruct_tokenizer.decode(ids[1:]) == f"Review: {row['sentence1']}\nVerdict:"
        assert example["input_ids"][:len(ids)] == ids and set(example["labels"][:len(ids)]) == {IGNORE_INDEX}
        supervised = [t for t in example["labels"] if t != IGNORE_INDEX]
        assert instruct_tokenizer.decode(supervised) == words[row["label"]] + instruct_tokenizer.eos_token
        assert example["input_ids"][len(ids)] == first_tokens[row["label"]]

    result = classify(model, instruct_tokenizer, rows, prompt=prompt, label_words=words)
    assert result.scores.shape == (3, 3)
    for row, scores in zip(rows, result.scores):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids(row, instruct_tokenizer, prompt)])).logits[0, -1]
        torch.testing.assert_close(scores, torch.log_softmax(logits, -1)[first_tokens], atol=1e-4, rtol=1e-4)

    # a label with no label word names the file, row and field; a prompt with an unknown field is refused
    path.write_text(json.dumps({**rows[0], "label": 3}) + "\n")
    with pytest.raises(DataFormatError, match=r"reviews.jsonl: row 1: field 'label' is 3; labels are 0, 1 or 2"):
        tokenized(str(path), cfg, instruct_tokenizer, limit=0)
    with pytest.raises(ConfigError, match=r"data.classification_prompt.*\['review'\]"):
        load_config(None, overrides + ["data.classification_prompt=Review: {review}\nVerdict:"])
    with pytest.raises(ValueError, match="only use"):
        classify(model, instruct_tokenizer, rows, prompt="{text}", label_words=words)
