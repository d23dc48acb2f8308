"""Command-line front end to the pitfall checks.

    python -m recipes_core.doctor data FILE --format {alpaca,chat,classification,tokenized} --tokenizer DIR
    python -m recipes_core.doctor tokenizers DIR_A DIR_B     identical, same-vocabulary or different
    python -m recipes_core.doctor checkpoint DIR             complete? what it holds, sizes vs prediction
    python -m recipes_core.doctor model DIR [--prompt TEXT]  chat template, stop ids, pad, echo test

Exit status 0 when every check passes (warnings allowed), 1 when one reports an error, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recipes_core.checks import Report, check_checkpoint, check_label_masks, check_model, check_tokenized, compare_tokenizers
from recipes_core.data import DataFormatError, load_records
from recipes_core.preprocess import FORMATS, tokenize_records
from recipes_core.tokens import end_token_ids, load_tokenizer


def _read_tokenized(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}: row {row}: invalid JSON ({err.msg})") from None
            for key in ("input_ids", "labels"):
                if not isinstance(record.get(key), list) or not all(isinstance(v, int) for v in record[key]):
                    raise DataFormatError(f"{path}: row {row}: field '{key}' must be a list of integers")
            rows.append(record)
    return rows


def data_report(path: str | Path, fmt: str, tokenizer_path: str | Path, max_seq_len: int | None = None,
                train_on_inputs: bool = False) -> Report:
    """Load, tokenize and check a data file: the function behind `doctor data`."""
    tokenizer = load_tokenizer(tokenizer_path)
    if fmt == "tokenized":
        examples = _read_tokenized(Path(path))
    else:
        examples = tokenize_records(load_records(path, fmt), fmt, tokenizer, max_seq_len, train_on_inputs)
    report = check_tokenized(examples, len(tokenizer), end_token_ids(tokenizer), title=f"data {path}")
    masks = check_label_masks(examples)
    report.findings += masks.findings
    return report


def tokenizers_report(path_a: str | Path, path_b: str | Path) -> Report:
    """The function behind `doctor tokenizers A B`."""
    return compare_tokenizers(load_tokenizer(path_a), load_tokenizer(path_b), title=f"tokenizers {path_a} vs {path_b}")


def model_report(path: str | Path, prompts: list[str] | None = None) -> Report:
    """The function behind `doctor model DIR`: a Hugging Face folder or a checkpoint."""
    from recipes_core.infer import load_for_inference

    model, tokenizer = load_for_inference(path)
    return check_model(model, tokenizer, prompts, title=f"model {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.doctor", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="report on a dataset as the trainer would see it")
    data.add_argument("path")
    data.add_argument("--format", required=True, choices=sorted(FORMATS) + ["tokenized"])
    data.add_argument("--tokenizer", required=True, help="tokenizer folder or hub name")
    data.add_argument("--max-seq-len", type=int, default=None)
    data.add_argument("--train-on-inputs", action="store_true")
    tokenizers = commands.add_parser("tokenizers", help="compare two tokenizers (vocabulary, template, specials)")
    tokenizers.add_argument("a")
    tokenizers.add_argument("b")
    checkpoint = commands.add_parser("checkpoint", help="is a checkpoint complete, what it holds, its size")
    checkpoint.add_argument("dir", help="step_<k> folder or a run folder with `latest`")
    model = commands.add_parser("model", help="chat template, stop tokens, pad, and an echo test")
    model.add_argument("dir", help="Hugging Face folder or checkpoint")
    model.add_argument("--prompt", action="append", default=None, help="echo-test prompt (repeatable)")
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            report = data_report(args.path, args.format, args.tokenizer, args.max_seq_len, args.train_on_inputs)
        elif args.command == "tokenizers":
            report = tokenizers_report(args.a, args.b)
        elif args.command == "checkpoint":
            report = check_checkpoint(args.dir)
        else:
            report = model_report(args.dir, args.prompt)
    except (DataFormatError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
