"""Classify by scoring label tokens: the model's next-token logits at the end of the prompt, compared
between the first token of each label word; the label whose word scores higher wins.

    from recipes_core.classify import classify
    result = classify(model, tokenizer, records)   # records: {"sentence1", "sentence2", "label"}
    result.accuracy, result.predictions
    # your own task: the prompt and label words the model was trained with (data.classification_prompt,
    # data.label_words in the recipe's config)
    result = classify(model, tokenizer, records, prompt="Review: {sentence1}\nVerdict:", label_words=(" bad", " good"))

Why scoring and not generation: the model was trained to put exactly one label word after the prompt, so
the question "which label?" is the question "which of these tokens is likelier next?". One forward pass
answers it, every example gets a prediction (generation can wander off into other words), and the result
does not depend on sampling settings.

The prompt is built by the training preprocessor's own functions (classification_prompt, prompt_token_ids):
bos + prompt tokens, exactly the context in which training supervised the label word. A template
written twice drifts; scoring a prompt the model never saw measures nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recipes_core.preprocess import (CLASSIFICATION_LABEL_WORDS, CLASSIFICATION_PROMPT, check_classification_task,
                                     classification_prompt, prompt_token_ids)


@dataclass
class ClassifyResult:
    predictions: list[int]  # predicted label index per record
    accuracy: float  # fraction of records whose "label" equals the prediction (nan without gold labels)
    scores: torch.Tensor  # (n_records, n_labels) next-token logits of the label tokens


def label_token_ids(tokenizer, label_words: tuple[str, ...] = CLASSIFICATION_LABEL_WORDS) -> list[int]:
    """The first token id of each label word. The first tokens must all differ: the logit at the end of
    the prompt can only tell labels apart by the token that comes first.

    A word may be more than one token (the tiny tokenizer, trained on the cookbook's data, splits " yes"
    into " y" + "es"; SmolLM2 and Llama 3 keep it whole): training supervises every piece, and the first
    one already decides which label the model is giving."""
    ids = []
    for word in label_words:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if not tokens:
            raise ValueError(f"label word {word!r} is no token at all for this tokenizer")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        pieces = {word: [tokenizer.decode([t]) for t in tokenizer.encode(word, add_special_tokens=False)]
                  for word in label_words}
        raise ValueError(f"label words {list(label_words)} start with the same token ({pieces}): the next-token "
                         "logit after the prompt cannot tell them apart; choose words whose first tokens differ")
    return ids


def prompt_ids(record: dict, tokenizer, prompt: str = CLASSIFICATION_PROMPT) -> list[int]:
    """bos + prompt, as training tokenizes it (tokenize_classification's input_ids before the answer)."""
    return prompt_token_ids(tokenizer, classification_prompt(record, prompt))


@torch.no_grad()
def classify(model, tokenizer, records: list[dict], batch_size: int = 64,
             label_words: tuple[str, ...] = CLASSIFICATION_LABEL_WORDS,
             prompt: str = CLASSIFICATION_PROMPT) -> ClassifyResult:
    """Predict every record's label (label k = label_words[k]); batches are left-padded so the last position
    of every row is the end of its prompt. Position ids count from each row's first real token, as in
    training. prompt and label_words must be the ones the model was trained with."""
    check_classification_task(prompt, label_words)
    label_ids = label_token_ids(tokenizer, label_words)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    try:
        for start in range(0, len(records), batch_size):
            prompts = [prompt_ids(r, tokenizer, prompt) for r in records[start:start + batch_size]]
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(prompts):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           position_ids=position_ids.to(device)).logits[:, -1, :]
            scores.append(torch.log_softmax(logits.float(), dim=-1)[:, label_ids].cpu())
    finally:
        model.train(was_training)
    scores = torch.cat(scores) if scores else torch.empty(0, len(label_ids))
    predictions = scores.argmax(dim=1).tolist()
    gold = [r.get("label") for r in records]
    if records and all(g is not None for g in gold):
        accuracy = sum(int(g) == p for g, p in zip(gold, predictions)) / len(records)
    else:
        accuracy = float("nan")
    return ClassifyResult(predictions=predictions, accuracy=accuracy, scores=scores)
