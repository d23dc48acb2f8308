"""Turn records into token ids and labels; every label that must not be learned is IGNORE_INDEX (-100).

Why -100 and nothing else: `torch.nn.functional.cross_entropy` (and so every Hugging Face causal LM)
skips targets equal to its `ignore_index`, whose default is -100. A label of -1 is not skipped: it is an
out-of-range class index (an error on CPU, a device-side assert or garbage on GPU).

Each function returns {"input_ids", "labels", "truncated"} with labels aligned to input_ids (the
model shifts them by one inside its loss, as in Hugging Face).
"""

from __future__ import annotations

import string
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
# The default classification task (the paraphrase question); data.classification_prompt and data.label_words
# set your own. The prompt may use {sentence1} and {sentence2}; label k is answered with label_words[k].
CLASSIFICATION_PROMPT = ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
                         "Do the two sentences mean the same thing? Answer:")
CLASSIFICATION_LABEL_WORDS = (" no", " yes")  # label 0, label 1; the leading space is part of the word
PROMPT_FIELDS = ("sentence1", "sentence2")


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


def check_classification_task(prompt: str, label_words: tuple[str, ...] | list[str]) -> None:
    """A prompt that only uses {sentence1} / {sentence2} (a typo such as {sentence} would fail on the first
    record) and at least two distinct, non-empty label words; ValueError says what is wrong."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
    except ValueError as err:
        raise ValueError(f"classification prompt {prompt!r}: {err} (write a literal brace as {{{{ or }}}})") from None
    unknown = sorted(fields - set(PROMPT_FIELDS))
    if unknown:
        raise ValueError(f"classification prompt uses {unknown}; it may only use "
                         f"{', '.join('{' + f + '}' for f in PROMPT_FIELDS)}")
    if len(label_words) < 2 or len(set(label_words)) != len(label_words) or not all(w.strip() for w in label_words):
        raise ValueError(f"label words {list(label_words)}: give at least two distinct, non-empty words, "
                         "one per label (label k is answered with word k)")


def classification_prompt(record: dict, prompt: str = CLASSIFICATION_PROMPT) -> str:
    return prompt.format(sentence1=record["sentence1"], sentence2=record["sentence2"])


def tokenize_classification(record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None = None,
                            train_on_inputs: bool = False, prompt: str = CLASSIFICATION_PROMPT,
                            label_words: tuple[str, ...] = CLASSIFICATION_LABEL_WORDS) -> dict[str, Any]:
    """Both sentences and the question masked; only the label word and EOS supervised, unless
    train_on_inputs, which supervises everything (the common mistake the notebooks measure)."""
    label = int(record["label"])
    if not 0 <= label < len(label_words):
        raise ValueError(f"label {record['label']!r} has no label word: labels are 0 to {len(label_words) - 1} "
                         f"for label words {list(label_words)}")
    return _prompt_answer(tokenizer, classification_prompt(record, prompt), label_words[label], max_seq_len,
                          train_on_inputs)


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
        marker = end_of_turn_marker(turn[end:])
        if marker:
            end = turn.index(marker, end) + len(marker)
        spans.append((len(prompt) + offset, len(prompt) + end))
    return text, spans


def end_of_turn_marker(after_content: str) -> str:
    """The one guess at a template's end-of-turn marker: what follows an assistant's content up to the next
    whitespace (<|eot_id|> in Llama 3, <|im_end|> in ChatML); "" when nothing follows."""
    return after_content.split()[0] if after_content.strip() else ""


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The text the chat template puts right after an assistant answer (<|eot_id|>, <|im_end|>); None
    without a chat template. The marker assistant_spans supervises, found the same way."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    answer = "Paris"
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": answer}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return end_of_turn_marker(text[text.rindex(answer) + len(answer):]) or None


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


def data_options(data_cfg) -> dict[str, Any]:
    """What a run's data config adds to its format's tokenize function: the template date for chat
    (fixed per run, DataConfig.chat_date), the prompt and label words for classification."""
    if data_cfg.format == "chat":
        return {"chat_date": data_cfg.chat_date}
    if data_cfg.format == "classification":
        return {"prompt": data_cfg.classification_prompt, "label_words": tuple(data_cfg.label_words)}
    return {}


def tokenize_records(records, fmt: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None = None,
                     train_on_inputs: bool = False, **options) -> list[dict[str, Any]]:
    """options go to the format's function: classification takes prompt= and label_words=."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {sorted(FORMATS)}")
    tokenize = FORMATS[fmt]
    return [tokenize(record, tokenizer, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs, **options)
            for record in records]


def tokenize_file(path: str, data_cfg, tokenizer: PreTrainedTokenizerBase, limit: int = 0) -> list[dict[str, Any]]:
    """One data file as a run reads it: loaded and validated (data.load_records), its first `limit` rows
    (0: all), tokenized with the run's data config. Preflight checks what this returns; training packs it."""
    from recipes_core.data import load_records

    records = load_records(path, data_cfg.format, num_labels=len(data_cfg.label_words))
    if limit:
        records = records.select(range(min(limit, len(records))))
    return tokenize_records(records, data_cfg.format, tokenizer, data_cfg.max_seq_len, data_cfg.train_on_inputs,
                            **data_options(data_cfg))


def explain_labels(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """One line per token: id, text, and whether it is supervised (its label) or masked (-100)."""
    lines = []
    for token_id, label in zip(example["input_ids"], example["labels"]):
        state = "masked -100" if label == IGNORE_INDEX else f"learn {label}"
        lines.append(f"{token_id:>6}  {tokenizer.decode([token_id])!r:<28} {state}")
    return "\n".join(lines)
