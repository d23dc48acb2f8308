"""The cookbook's small datasets, generated deterministically from word lists written here.

    python -m recipes_core.synthetic_data --out DIR [--seed 0]      (or: python cookbook/make_datasets.py)

Writes (JSON Lines, one example a line):
  alpaca_train.jsonl / alpaca_eval.jsonl   Alpaca format: instruction, input, output
  chat_train.jsonl / chat_eval.jsonl       chat format: messages = [{role, content}, ...]
  pawsx_train.jsonl / pawsx_eval.jsonl     PAWS-X shape: sentence1, sentence2, label (1 = paraphrase)
  reviews_train.jsonl / reviews_eval.jsonl classification: a review, a fixed claim, label (1 = the review
                                           agrees with the claim); a lexical task a tiny model learns on CPU

No text is copied from public datasets. The tasks are rules, not facts, so held-out accuracy measures
whether a model learned the rule: an eval example is never a train example (checked below), but it
is built from the same vocabulary, so a tiny model trained for a few CPU minutes can get it right.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

POSITIVE = ["wonderful", "great", "lovely", "excellent", "friendly", "delicious", "pleasant", "superb",
            "cheerful", "perfect", "charming", "fantastic"]
NEGATIVE = ["awful", "terrible", "rude", "bland", "dirty", "horrible", "boring", "broken", "cold",
            "noisy", "slow", "disappointing"]
REVIEW_NOUNS = ["soup", "staff", "room", "movie", "service", "coffee", "music", "garden", "hotel",
                "waiter", "pizza", "train", "book", "concert", "bed", "view"]
REVIEW_TEMPLATES = [
    "the {n1} was {a1} and the {n2} was {a2}",
    "what a {a1} {n1}, and the {n2} was {a2} too",
    "i found the {n1} {a1} and the {n2} {a2}",
    "honestly the {n1} was {a1}; the {n2} felt {a2}",
]

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "mango", "pear", "plum", "grape", "lemon"],
    "animal": ["horse", "tiger", "rabbit", "eagle", "otter", "wolf", "camel", "sheep"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "tool": ["hammer", "wrench", "saw", "drill", "chisel", "shovel", "ladder", "rake"],
    "vehicle": ["bus", "truck", "bicycle", "tractor", "scooter", "boat", "van", "taxi"],
}
PLACES = ["market", "farm", "harbor", "school", "station", "park", "shed", "bridge", "river", "shop"]
CATEGORY_TEMPLATES = [
    "we saw a {item} near the {place}",
    "there is a {item} behind the {place}",
    "my friend drew a {item} at the {place}",
    "a {item} was left by the {place}",
]

LIST_WORDS = sorted({w for items in CATEGORIES.values() for w in items} | set(PLACES))
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

INSTRUCTIONS = {
    "sentiment": ["Classify the sentiment of this review as positive or negative.",
                  "Is this review positive or negative?",
                  "Tell me whether the following review is positive or negative."],
    "category": ["Which category does the item in this sentence belong to?",
                 "Name the category of the thing mentioned in the sentence.",
                 "What kind of thing is mentioned here? Answer with its category."],
    "first": ["What is the first word in this list?",
              "Give the first item of the list.",
              "Return the word that comes first in this list."],
    "count": ["How many words are in this list?",
              "Count the items in the list and answer with a number word.",
              "How many items does this list contain?"],
}

SYSTEM_PROMPTS = ["You are a concise assistant. Answer with one word.",
                  "You are a helpful assistant that answers briefly."]

SUBJECTS = ["the teacher", "the farmer", "the pilot", "the doctor", "the baker", "the singer",
            "the sailor", "the painter", "the lawyer", "the student", "the driver", "the nurse"]
VERBS = [("helped", "was helped by"), ("called", "was called by"), ("visited", "was visited by"),
         ("thanked", "was thanked by"), ("followed", "was followed by"), ("watched", "was watched by"),
         ("invited", "was invited by"), ("praised", "was praised by")]
TIMES = ["yesterday", "on monday", "last week", "this morning", "at noon", "in the evening"]


def _sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    words = POSITIVE if label == "positive" else NEGATIVE
    n1, n2 = rng.sample(REVIEW_NOUNS, 2)
    a1, a2 = rng.sample(words, 2)
    return rng.choice(REVIEW_TEMPLATES).format(n1=n1, n2=n2, a1=a1, a2=a2), label


def _category(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(sorted(CATEGORIES))
    item = rng.choice(CATEGORIES[category])
    return rng.choice(CATEGORY_TEMPLATES).format(item=item, place=rng.choice(PLACES)), category


def _first(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(LIST_WORDS, rng.randint(2, 5))
    return ", ".join(words), words[0]


def _count(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(2, 5)
    return ", ".join(rng.sample(LIST_WORDS, n)), NUMBER_WORDS[n]


TASKS = {"sentiment": _sentiment, "category": _category, "first": _first, "count": _count}


def alpaca_example(rng: random.Random) -> dict:
    task = rng.choice(sorted(TASKS))
    text, answer = TASKS[task](rng)
    return {"instruction": rng.choice(INSTRUCTIONS[task]), "input": text, "output": answer}


def chat_example(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.randint(1, 2)):
        ex = alpaca_example(rng)
        messages.append({"role": "user", "content": f"{ex['instruction']}\n{ex['input']}"})
        messages.append({"role": "assistant", "content": ex["output"]})
    return {"messages": messages}


def pawsx_example(rng: random.Random) -> dict:
    """Paraphrase = the same event in active and passive voice. Non-paraphrases are built the PAWS way
    (the same words with the roles swapped) or with one participant replaced."""
    a, b, c = rng.sample(SUBJECTS, 3)
    active, passive = rng.choice(VERBS)
    when = rng.choice(TIMES)
    sentence1 = f"{a} {active} {b} {when}."
    kind = rng.choice(["paraphrase", "paraphrase", "swapped", "replaced"])
    if kind == "paraphrase":
        sentence2, label = f"{b} {passive} {a} {when}.", 1
    elif kind == "swapped":
        sentence2, label = f"{a} {passive} {b} {when}.", 0
    else:
        sentence2, label = f"{c} {passive} {a} {when}.", 0
    if rng.random() < 0.5:
        sentence1, sentence2 = sentence2, sentence1
    return {"sentence1": sentence1.capitalize(), "sentence2": sentence2.capitalize(), "label": label}


REVIEW_CLAIM = "I liked it."


def review_example(rng: random.Random) -> dict:
    """A review written with POSITIVE or NEGATIVE words, and the claim "I liked it.": label 1 when the review
    agrees with the claim. Lexical on purpose: the adjectives alone decide the label, so a randomly initialized
    tiny model can learn it in a few dozen CPU steps (the paraphrase pairs need far more)."""
    text, sentiment = _sentiment(rng)
    return {"sentence1": text.capitalize() + ".", "sentence2": REVIEW_CLAIM, "label": int(sentiment == "positive")}


def _split(make, rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Draw unique examples; the eval split holds none of the train examples."""
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n_train + n_eval:
        attempts += 1
        if attempts > 50 * (n_train + n_eval):
            raise RuntimeError(f"could not draw {n_train + n_eval} distinct examples from {make.__name__}")
        row = make(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows[:n_train], rows[n_train:]


def build_all(seed: int = 0) -> dict[str, list[dict]]:
    """{file name: rows} for every dataset, in memory (write_all writes them; the tiny tokenizer is trained
    on some of them without writing anything)."""
    files = {}
    for name, make, n_train, n_eval in [("alpaca", alpaca_example, 2000, 200),
                                         ("chat", chat_example, 1000, 100),
                                         ("pawsx", pawsx_example, 1500, 300),
                                         ("reviews", review_example, 2000, 300)]:
        train, evaluation = _split(make, random.Random(f"{seed}-{name}"), n_train, n_eval)
        files[f"{name}_train.jsonl"], files[f"{name}_eval.jsonl"] = train, evaluation
    return files


def write_all(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write every dataset as JSON Lines into out_dir (the files in cookbook/data are this with seed 0)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, rows in build_all(seed).items():
        path = out / filename
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None, default_out: str | None = None) -> None:
    """The command line; cookbook/make_datasets.py calls it with the cookbook's data folder as default_out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_out, required=default_out is None,
                        help="the folder to write the .jsonl files into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_all(args.out, args.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
