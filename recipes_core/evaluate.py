"""Evaluate a fine-tuned model with lm-evaluation-harness on the cookbook's held-out sets, offline.

    python -m recipes_core.evaluate MODEL [--baseline BASE] [--data cookbook/data] [--chat-template both]

MODEL and BASE are each a Hugging Face folder, a checkpoint step folder or a run folder (its `latest`); a
checkpoint is rebuilt in memory, nothing is written next to it. One task per held-out file
(`<name>_eval.jsonl` in --data), by the file's format:

  rc_chat       chat rows: the last user turn (its system message too) -> greedy answer, exact match with the
                recorded assistant answer. Generation stops on every end id (eos and end of turn).
  rc_alpaca     Alpaca rows: multiple choice by log-likelihood, the right output against 3 outputs of other rows.
  rc_<name>     classification rows: multiple choice between the label words (data.label_words) after the
                classification prompt (data.classification_prompt), as training formats them.
  rc_<name>_text  the same Alpaca rows as text in the Alpaca prompt format: bits per byte (log-likelihood of
                held-out text of another kind than chat; what fine-tuning costs in general ability shows here).

The tasks are written as ordinary lm-eval YAML files plus JSONL data (OUT/tasks), so the same evaluation
runs with lm-eval's own command line:  lm_eval --model hf --model_args pretrained=DIR
--include_path OUT/tasks --tasks rc_chat --apply_chat_template. Nothing is downloaded: the data are local
files, the model is loaded from disk.

--chat-template on|off|both|auto: whether prompts go through the tokenizer's chat template. A chat model
asked without it sees a prompt format it never saw; `both` measures exactly that. Text tasks never use it.
"""

from __future__ import annotations

import os

# lm-eval and datasets must not reach the network; set before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import contextlib
import io
import json
import logging
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from recipes_core.data import SCHEMAS, DataFormatError, load_records
from recipes_core.errors import UsageError, UserError, command
from recipes_core.preprocess import CLASSIFICATION_LABEL_WORDS, CLASSIFICATION_PROMPT, alpaca_prompt, \
    check_classification_task, classification_prompt

TEMPLATE_MODES = ("auto", "on", "off", "both")
N_CHOICES = 4  # Alpaca multiple choice: the right output and 3 others (chance is 1 / 4)


class EvalSetupError(UserError, ValueError):
    """A data folder, task name or model that cannot be evaluated."""


@dataclass
class Score:
    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    chat_template: bool
    higher_is_better: bool = True


@dataclass
class EvalResult:
    model: str
    scores: list[Score] = field(default_factory=list)

    def get(self, task: str, chat_template: bool | None = None) -> Score:
        """The score of one task (with or without the chat template when both were run)."""
        found = [s for s in self.scores if s.task == task and chat_template in (None, s.chat_template)]
        if not found:
            raise KeyError(f"{task} (chat template {chat_template}) was not evaluated; have {self.rows()}")
        return found[0]

    def rows(self) -> list[tuple[str, bool]]:
        return [(s.task, s.chat_template) for s in self.scores]


# ---------------------------------------------------------------- task files (data + lm-eval YAML)

def detect_format(path: Path) -> str:
    """The data format of a held-out file from its first row's fields (chat, alpaca or classification)."""
    from recipes_core.data import read_text

    first = next((line for line in read_text(path).splitlines() if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: row 1: invalid JSON ({err.msg}); each line must be one JSON object") from None
    for fmt in ("chat", "alpaca", "classification"):
        if isinstance(record, dict) and set(SCHEMAS[fmt]) - {"input"} <= set(record):
            return fmt
    raise DataFormatError(f"{path}: row 1 has fields {sorted(record) if isinstance(record, dict) else record!r}; "
                          f"expected one of the formats {sorted(SCHEMAS)} (e.g. 'messages', or 'instruction' and "
                          "'output', or 'sentence1', 'sentence2' and 'label')")


def alpaca_question(record: dict) -> str:
    """What a user would type: the instruction, then the input on its own line."""
    return record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")


def chat_docs(records) -> list[dict]:
    docs = []
    for record in records:
        messages = record["messages"]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user") if any(
            m["role"] == "user" for m in messages) else None
        answer = next((m["content"] for m in messages[(last_user or 0) + 1:] if m["role"] == "assistant"), None)
        if last_user is None or answer is None:
            continue  # no user turn followed by an answer: nothing to ask
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        docs.append({"system": system, "question": messages[last_user]["content"], "answer": answer.strip()})
    return docs


def alpaca_choice_docs(records, seed: int = 0) -> list[dict]:
    """Each row's output among N_CHOICES - 1 different outputs of other rows, in a seeded order."""
    outputs = sorted({r["output"].strip() for r in records})
    if len(outputs) < N_CHOICES:
        return []
    docs = []
    for i, record in enumerate(records):
        rng = random.Random(seed * 100_003 + i)
        gold = record["output"].strip()
        choices = rng.sample([o for o in outputs if o != gold], N_CHOICES - 1) + [gold]
        rng.shuffle(choices)
        docs.append({"question": alpaca_question(record), "choices": choices, "gold": choices.index(gold)})
    return docs


def classification_docs(records, prompt: str, label_words) -> list[dict]:
    return [{"question": classification_prompt(r, prompt), "choices": list(label_words), "gold": int(r["label"])}
            for r in records]


def text_docs(records) -> list[dict]:
    """Each Alpaca row as the Alpaca recipe writes it (prompt scaffold, instruction, input, answer): the form
    in which a model trained on such text knows it."""
    return [{"text": alpaca_prompt(r) + r["output"]} for r in records]


def _task_yaml(name: str, data_file: Path, body: dict) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", "num_fewshot": 0, **body}


def read_eval_sets(data_dir: str | Path, label_words=CLASSIFICATION_LABEL_WORDS) -> dict[str, tuple[str, list]]:
    """{name: (format, validated records)} for every `<name>_eval.jsonl` in data_dir; a bad row is an error
    naming the file and row, found before any model is loaded."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvalSetupError(f"--data {data_dir}: no such folder; give the folder holding the held-out "
                             "<name>_eval.jsonl files (`python cookbook/make_datasets.py` writes cookbook/data)")
    files = sorted(data_dir.glob("*_eval.jsonl"))
    if not files:
        raise EvalSetupError(f"--data {data_dir}: no <name>_eval.jsonl file in it; give the folder of the held-out sets")
    sets = {}
    for path in files:
        fmt = detect_format(path)
        sets[path.name[: -len("_eval.jsonl")]] = (fmt, list(load_records(path, fmt, num_labels=len(label_words))))
    return sets


def task_names(sets: dict[str, tuple[str, list]]) -> list[str]:
    """The lm-eval tasks the held-out sets give (an Alpaca set gives two: multiple choice and text)."""
    return [name for stem, (fmt, _) in sets.items()
            for name in ([f"rc_{stem}", f"rc_{stem}_text"] if fmt == "alpaca" else [f"rc_{stem}"])]


def write_tasks(sets: dict[str, tuple[str, list]], out_dir: str | Path, stop_strings: list[str],
                max_new_tokens: int = 16, classification_prompt_text: str = CLASSIFICATION_PROMPT,
                label_words=CLASSIFICATION_LABEL_WORDS, seed: int = 0) -> list[str]:
    """Write one lm-eval task (YAML + JSONL) per held-out set (read_eval_sets) into out_dir; returns the task
    names. stop_strings: the text of every end token, so generation stops at the end of the turn."""
    import yaml

    check_classification_task(classification_prompt_text, label_words)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, tuple[list[dict], dict]] = {}
    for stem, (fmt, records) in sets.items():
        if fmt == "chat":
            tasks[f"rc_{stem}"] = (chat_docs(records), {
                "output_type": "generate_until", "description": "{{system}}", "doc_to_text": "{{question}}",
                "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": stop_strings, "max_gen_toks": max_new_tokens, "do_sample": False},
                "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                             {"function": "take_first"}]}],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "ignore_case": True, "ignore_punctuation": False}]})
        elif fmt == "alpaca":
            tasks[f"rc_{stem}"] = (alpaca_choice_docs(records, seed), {
                "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{gold}}", "target_delimiter": "\n",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
            tasks[f"rc_{stem}_text"] = (text_docs(records), {
                "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                "metric_list": [{"metric": "bits_per_byte", "aggregation": "bits_per_byte",
                                 "higher_is_better": False}]})
        else:
            tasks[f"rc_{stem}"] = (classification_docs(records, classification_prompt_text, label_words), {
                "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{gold}}", "target_delimiter": "",  # label words carry their own space
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
    for name, (docs, body) in tasks.items():
        data_file = out_dir / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(_task_yaml(name, data_file.resolve(), body),
                                                             sort_keys=False), encoding="utf-8")
    return [name for name, (docs, _) in tasks.items() if docs]


# ---------------------------------------------------------------- running lm-eval

def check_model_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise EvalSetupError(f"{path}: no such model folder; give a Hugging Face folder (config.json), a "
                             "checkpoint step_<k> folder or a run folder")
    return path


def load_model(path: str | Path):
    """(model, tokenizer) for an HF folder, a checkpoint step folder or a run folder; the generation config
    stops on every end id (what infer.generate does)."""
    from recipes_core.checkpoint import is_run_folder, resolve_checkpoint
    from recipes_core.infer import load_for_inference
    from recipes_core.tokens import end_token_ids

    path = check_model_path(path)
    if is_run_folder(path):
        path = resolve_checkpoint(path)
    model, tokenizer = load_for_inference(path)
    model.generation_config.eos_token_id = end_token_ids(tokenizer, model.generation_config)
    return model, tokenizer


def stop_strings(tokenizer, model) -> list[str]:
    """The text of every end id (lm-eval stops generation on strings)."""
    from recipes_core.tokens import end_token_ids

    return [tokenizer.convert_ids_to_tokens(i) for i in end_token_ids(tokenizer, model.generation_config)]


def template_settings(tokenizer, mode: str) -> list[bool]:
    """The chat-template settings to run: auto = on when the tokenizer has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has_template:
        raise EvalSetupError(f"--chat-template on: the tokenizer of {tokenizer.name_or_path} has no chat template "
                             "(a base model); use --chat-template off or auto")
    return {"auto": [has_template], "on": [True], "off": [False], "both": [True, False] if has_template else [False]}[mode]


def evaluate(model_path: str | Path, data_dir: str | Path, out_dir: str | Path | None = None,
             tasks: list[str] | None = None, chat_template: str = "auto", limit: int | None = None,
             batch_size: int = 32, max_new_tokens: int = 16, label_words=CLASSIFICATION_LABEL_WORDS,
             prompt: str = CLASSIFICATION_PROMPT, seed: int = 0, quiet: bool = False) -> EvalResult:
    """Run the held-out tasks on one model with lm-eval; out_dir keeps the generated tasks (a temporary
    folder when None). chat_template: auto | on | off | both (text tasks always run without it).
    quiet: hide lm-eval's own progress bars (one per request type and task) and its log lines."""
    if chat_template not in TEMPLATE_MODES:
        raise UsageError(f"--chat-template {chat_template}: choose one of {TEMPLATE_MODES}")
    check_model_path(model_path)
    check_classification_task(prompt, label_words)
    sets = read_eval_sets(data_dir, label_words)  # bad data and unknown tasks fail before the model loads
    chosen = tasks or task_names(sets)
    unknown = [t for t in chosen if t not in task_names(sets)]
    if unknown:
        raise EvalSetupError(f"--tasks {','.join(unknown)}: no such task here; the held-out files in {data_dir} "
                             f"give {', '.join(task_names(sets))}")
    model, tokenizer = load_model(model_path)
    with tempfile.TemporaryDirectory(prefix="rc_eval_") as tmp:
        task_dir = Path(out_dir) / "tasks" if out_dir else Path(tmp)
        written = write_tasks(sets, task_dir, stop_strings(tokenizer, model), max_new_tokens, prompt, label_words, seed)
        chosen = [t for t in chosen if t in written]  # a set too small for its task (e.g. < 4 Alpaca outputs)
        result = EvalResult(model=str(model_path))
        for use_template in template_settings(tokenizer, chat_template):
            names = [t for t in chosen if not (use_template and t.endswith("_text"))]
            if not use_template or names:
                with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
                    result.scores += _run(model, tokenizer, task_dir, names, use_template, limit, batch_size, seed)
    return result


def _run(model, tokenizer, task_dir: Path, names: list[str], use_template: bool, limit, batch_size: int,
         seed: int) -> list[Score]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalSetupError("lm-evaluation-harness is not installed: pip install -c constraints.txt 'lm_eval==0.4.13' "
                             "(it is in the dev extras: pip install -e '.[dev]')") from None

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-request logging drowns the table
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, apply_chat_template=use_template,
                          fewshot_as_multiturn=use_template, limit=limit, bootstrap_iters=0, log_samples=False,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    scores = []
    for name in names:
        metrics = out["results"][name]
        higher = out.get("higher_is_better", {}).get(name, {})
        for key, value in metrics.items():
            if "," not in key or key.endswith("_stderr") or "stderr" in key.split(",")[0]:
                continue
            metric = key.split(",")[0]
            stderr = metrics.get(f"{metric}_stderr,{key.split(',', 1)[1]}")
            scores.append(Score(name, metric, float(value), stderr if isinstance(stderr, float) else None,
                                int(out["n-samples"][name]["effective"]), use_template, higher.get(metric, True)))
    return scores


# ---------------------------------------------------------------- the table

def table(after: EvalResult, before: EvalResult | None = None) -> str:
    """One row per task, metric and chat-template setting; with a baseline, before, after and the change."""
    header = f"{'task':<18} {'metric':<14} {'template':<8} {'n':>4} "
    header += f"{'before':>8} {'after':>8} {'change':>8}" if before else f"{'score':>8}"
    lines = [header, "-" * len(header)]
    for s in after.scores:
        row = f"{s.task:<18} {s.metric:<14} {'on' if s.chat_template else 'off':<8} {s.n:>4} "
        if before:
            match = [b for b in before.scores if (b.task, b.metric, b.chat_template) == (s.task, s.metric, s.chat_template)]
            if match:
                row += f"{match[0].value:>8.3f} {s.value:>8.3f} {s.value - match[0].value:>+8.3f}"
            else:
                row += f"{'n/a':>8} {s.value:>8.3f} {'':>8}"
        else:
            row += f"{s.value:>8.3f}"
        lines.append(row + ("" if s.higher_is_better else "  (lower is better)"))
    return "\n".join(lines)


@command  # bad input -> one `error:` line, exit 2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Hugging Face folder, checkpoint step folder or run folder")
    parser.add_argument("--baseline", help="a second model (e.g. the one before fine-tuning): before/after table")
    parser.add_argument("--data", default="cookbook/data", help="folder of <name>_eval.jsonl files")
    parser.add_argument("--tasks", help="comma-separated task names (default: every task the data give)")
    parser.add_argument("--chat-template", choices=TEMPLATE_MODES, default="auto")
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--classification-prompt", default=CLASSIFICATION_PROMPT,
                        help="the prompt the model was trained with (data.classification_prompt)")
    parser.add_argument("--label-words", help='JSON list, as data.label_words: \'[" bad", " good"]\'')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="keep the generated tasks and results.json here")
    args = parser.parse_args(argv)
    for option in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} {value}: must be at least 1")
    label_words = CLASSIFICATION_LABEL_WORDS
    if args.label_words:
        try:
            label_words = tuple(json.loads(args.label_words))
        except json.JSONDecodeError as err:
            raise UsageError(f"--label-words {args.label_words}: not a JSON list ({err.msg}); e.g. '[\" no\", \" yes\"]'") from None
    try:
        check_classification_task(args.classification_prompt, label_words)
    except ValueError as err:
        raise UsageError(f"--classification-prompt / --label-words: {err}") from None
    options = dict(tasks=args.tasks.split(",") if args.tasks else None, chat_template=args.chat_template,
                   limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                   label_words=label_words, prompt=args.classification_prompt, seed=args.seed)
    for path in filter(None, (args.model, args.baseline)):
        check_model_path(path)  # before the first model's evaluation, not after it
    out = Path(args.out) if args.out else None
    before = evaluate(args.baseline, args.data, out / "baseline" if out else None, **options) if args.baseline else None
    after = evaluate(args.model, args.data, out / "model" if out else None, **options)
    print(f"model:    {args.model}" + (f"\nbaseline: {args.baseline}" if args.baseline else ""))
    print(table(after, before))
    if out:
        from dataclasses import asdict

        results = {"model": asdict(after), "baseline": asdict(before) if before else None}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"tasks and results.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
