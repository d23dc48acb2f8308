"""Turn records into token ids and labels; every label that must not be learned is IGNORE_INDEX (-100).

Why -100 and nothing else: `torch.nn.functional.cross_entropy` (and so every Hugging Face causal LM)
skips targets equal to its `ignore_index`, whose default is -100. A label of -1 is not skipped: it is an
out-of-range class index (an error on CPU, a device-side assert or garbage on GPU).

Each function returns {"input_ids", "labels", "truncated"} with labels aligned to input_ids (the
model shifts them by one inside its loss, as in Hugging Face).
"""

from __future__ import annotations

from typing import Any, Callable

from transformers import PreTrainedTokenizerBase

from recipes_core import IGNORE_INDEX

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
CLASSIFICATION_PROMPT = ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
                         "Do the two sentences mean the same thing? Answer:")
CLASSIFICATION_LABEL_WORDS = (" no", " yes")  # label 0, label 1; the leading space is part of the word


def _finish(ids: list[int], labels: list[int], max_seq_len: int | None) -> dict[str, Any]:
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    if truncated:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """bos (if the tokenizer has one) + the prompt's tokens: the part of an example the model reads
    before the answer, so inference builds exactly what training saw."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return prefix + tokenizer.encode(prompt, add_special_tokens=False)


def _prompt_answer(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str,
                   max_seq_len: int | None, train_on_inputs: bool) -> dict[str, Any]:
    """bos + prompt + answer + eos, tokenized in two pieces so no token straddles the boundary."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the answer's end cannot be supervised")
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    if tokenizer.bos_token_id is not None:
        prompt_labels[0] = IGNORE_INDEX  # nothing precedes bos, so it is never a prediction target
    return _finish(prompt_ids + answer_ids, prompt_labels + answer_ids, max_seq_len)


def alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return ALPACA_PROMPT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])


def tokenize_alpaca(record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None = None,
                    train_on_inputs: bool = False) -> dict[str, Any]:
    """Prompt template and its tokens masked; the answer and EOS supervised."""
    return _prompt_answer(tokenizer, alpaca_prompt(record), record["output"], max_seq_len, train_on_inputs)


def classification_prompt(record: dict) -> str:
    return CLASSIFICATION_PROMPT.format(sentence1=record["sentence1"], sentence2=record["sentence2"])


def tokenize_classification(record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None = None,
                            train_on_inputs: bool = False) -> dict[str, Any]:
    """Both sentences and the question masked; only the label word and EOS supervised, unless
    train_on_inputs, which supervises everything (the common mistake the notebooks measure)."""
    answer = CLASSIFICATION_LABEL_WORDS[int(record["label"])]
    return _prompt_answer(tokenizer, classification_prompt(record), answer, max_seq_len, train_on_inputs)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                    template_vars: dict | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation with the tokenizer's own chat template and return (text, spans): the
    character span of each assistant turn's content plus its end-of-turn marker.

    Nothing here knows a template: the prompt before turn i is the rendering of messages[:i] with the
    generation prompt; the turn is what rendering messages[:i+1] adds after it. The end-of-turn marker
    is what follows the content up to the next whitespace (<|eot_id|> in Llama 3, <|im_end|> in ChatML).
    template_vars are extra template variables, e.g. {"date_string": "26 Jul 2024"} (see chat_template_vars).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template: chat data needs one (use the instruct "
                         "tokenizer, or the Alpaca format for a base model)")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                                             **(template_vars or {}))
    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        through_turn = render(messages[: i + 1], False)
        if not (through_turn.startswith(prompt) and text.startswith(through_turn)):
            raise ValueError("the chat template does not render conversations prefix by prefix, so assistant "
                             f"turns cannot be located (turn {i}); mask this format by hand")
        turn = through_turn[len(prompt):]
        content = message["content"].strip()
        offset = turn.find(content)
        if offset < 0:
            raise ValueError(f"assistant turn {i}: its content does not appear in the rendered template")
        end = offset + len(content)
        rest = turn[end:]
        marker = rest.split()[0] if rest.strip() else ""
        if marker:
            end = turn.index(marker, end) + len(marker)
        spans.append((len(prompt) + offset, len(prompt) + end))
    return text, spans


def chat_template_vars(chat_date: str = "") -> dict:
    """Template variables that pin what a template would otherwise take from the clock: Llama 3.1+
    templates render `date_string` when it is given, else strftime_now("%d %b %Y") (today)."""
    return {"date_string": chat_date} if chat_date else {}


def today_for_templates() -> str:
    """Today's date in the format Llama 3.1+ templates render it ("03 Dec 2026")."""
    import datetime

    return datetime.datetime.now().strftime("%d %b %Y")


def tokenize_chat(record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None = None,
                  train_on_inputs: bool = False, chat_date: str = "") -> dict[str, Any]:
    """Only assistant turns (content and end-of-turn token) supervised; system/user turns and role
    headers masked. Token ids come from the rendered text's offsets, not from hard-coded ids.
    chat_date: the date the template renders ("" = whatever the template does: today for Llama 3.1+)."""
    text, spans = assistant_spans(tokenizer, record["messages"], chat_template_vars(chat_date))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = []
    for token_id, (start, end) in zip(ids, encoding["offset_mapping"]):
        inside = any(s <= start and end <= e for s, e in spans)
        labels.append(token_id if inside or train_on_inputs else IGNORE_INDEX)
    if ids and ids[0] == tokenizer.bos_token_id:
        labels[0] = IGNORE_INDEX
    return _finish(ids, labels, max_seq_len)


FORMATS: dict[str, Callable[..., dict[str, Any]]] = {
    "alpaca": tokenize_alpaca,
    "chat": tokenize_chat,
    "classification": tokenize_classification,
}


def tokenize_records(records, fmt: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None = None,
                     train_on_inputs: bool = False, chat_date: str = "") -> list[dict[str, Any]]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {sorted(FORMATS)}")
    tokenize = FORMATS[fmt]
    extra = {"chat_date": chat_date} if fmt == "chat" else {}
    return [tokenize(record, tokenizer, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs, **extra)
            for record in records]


def explain_labels(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """One line per token: id, text, and whether it is supervised (its label) or masked (-100)."""
    lines = []
    for token_id, label in zip(example["input_ids"], example["labels"]):
        state = "masked -100" if label == IGNORE_INDEX else f"learn {label}"
        lines.append(f"{token_id:>6}  {tokenizer.decode([token_id])!r:<28} {state}")
    return "\n".join(lines)
