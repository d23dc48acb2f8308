"""Command-line front end to the pitfall checks.

    python -m recipes_core.doctor data FILE --format {alpaca,chat,classification,tokenized} --tokenizer DIR
    python -m recipes_core.doctor tokenizers DIR_A DIR_B     identical, same-vocabulary or different
    python -m recipes_core.doctor checkpoint DIR             complete? what it holds, sizes vs prediction
    python -m recipes_core.doctor model DIR [--prompt TEXT]  chat template, stop ids, pad, echo test

Exit status 0 when every check passes (warnings allowed), 1 when one reports an error, 2 for bad input
(one `error:` line): a file that cannot be read, and data no run could train on (no supervised token left,
a token id past the model's embedding), the same errors finetune's preflight stops on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recipes_core.checks import (Report, check_checkpoint, check_label_masks, check_model, check_tokenized,
                                 compare_tokenizers, untrainable_errors)
from recipes_core.data import DataFormatError, load_records, read_text
from recipes_core.errors import UsageError, command
from recipes_core.preprocess import FORMATS, tokenize_records
from recipes_core.tokens import end_token_ids, load_tokenizer


def _read_tokenized(path: Path) -> list[dict]:
    rows = []
    if not path.is_file():
        raise DataFormatError(f"{path}: no such data file")
    for row, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: row {row}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}: row {row}: expected a JSON object, got {type(record).__name__}")
        for key in ("input_ids", "labels"):
            if not isinstance(record.get(key), list) or not all(isinstance(v, int) for v in record[key]):
                raise DataFormatError(f"{path}: row {row}: field '{key}' must be a list of integers")
        rows.append(record)
    return rows


def embedding_rows(model_path: str | Path | None) -> int | None:
    """The model's vocab_size (rows of its embedding) from a folder's config.json, when there is one."""
    config = Path(model_path) / "config.json" if model_path else None
    if config is None or not config.is_file():
        return None
    from recipes_core.models import check_model_folder

    check_model_folder(model_path)
    return json.loads(config.read_text(encoding="utf-8")).get("vocab_size")


def data_report(path: str | Path, fmt: str, tokenizer_path: str | Path, max_seq_len: int | None = None,
                train_on_inputs: bool = False, model_path: str | Path | None = None) -> Report:
    """Load, tokenize and check a data file: the function behind `doctor data`. Data no run could train on
    raises DataFormatError; token ids are compared with the embedding of model_path (default: the
    tokenizer folder, when it is a model folder)."""
    tokenizer = load_tokenizer(tokenizer_path)
    if fmt == "tokenized":
        examples = _read_tokenized(Path(path))
    else:
        examples = tokenize_records(load_records(path, fmt), fmt, tokenizer, max_seq_len, train_on_inputs)
    rows = embedding_rows(model_path or tokenizer_path)
    errors = untrainable_errors(examples, str(path), f"--max-seq-len {max_seq_len}" if max_seq_len else None,
                                rows, tokenizer)
    if errors:
        raise DataFormatError(errors[0])
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


@command  # bad input -> one `error:` line, exit 2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.doctor", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="report on a dataset as the trainer would see it")
    data.add_argument("path")
    data.add_argument("--format", required=True, choices=sorted(FORMATS) + ["tokenized"])
    data.add_argument("--tokenizer", required=True, help="tokenizer folder or hub name")
    data.add_argument("--max-seq-len", type=int, default=None)
    data.add_argument("--train-on-inputs", action="store_true")
    data.add_argument("--model", default=None, help="model folder whose embedding size the token ids must fit "
                                                      "(default: the tokenizer folder, when it has a config.json)")
    tokenizers = commands.add_parser("tokenizers", help="compare two tokenizers (vocabulary, template, specials)")
    tokenizers.add_argument("a")
    tokenizers.add_argument("b")
    checkpoint = commands.add_parser("checkpoint", help="is a checkpoint complete, what it holds, its size")
    checkpoint.add_argument("dir", help="step_<k> folder or a run folder with `latest`")
    model = commands.add_parser("model", help="chat template, stop tokens, pad, and an echo test")
    model.add_argument("dir", help="Hugging Face folder or checkpoint")
    model.add_argument("--prompt", action="append", default=None, help="echo-test prompt (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "data":
        if args.max_seq_len is not None and args.max_seq_len < 2:
            raise UsageError(f"--max-seq-len {args.max_seq_len}: must be at least 2 (a token predicts the next one)")
        report = data_report(args.path, args.format, args.tokenizer, args.max_seq_len, args.train_on_inputs,
                             args.model)
    elif args.command == "tokenizers":
        report = tokenizers_report(args.a, args.b)
    elif args.command == "checkpoint":
        report = check_checkpoint(args.dir)
    else:
        report = model_report(args.dir, args.prompt)
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
