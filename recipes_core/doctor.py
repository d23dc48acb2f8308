"""Command-line front end to the pitfall checks.

    python -m recipes_core.doctor data FILE --format {alpaca,chat,classification,tokenized} --tokenizer DIR

Exit status 0 when every check passes (warnings allowed), 1 when one reports an error, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recipes_core.checks import Report, check_tokenized
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
    return check_tokenized(examples, len(tokenizer), end_token_ids(tokenizer), title=f"data {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.doctor", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="report on a dataset as the trainer would see it")
    data.add_argument("path")
    data.add_argument("--format", required=True, choices=sorted(FORMATS) + ["tokenized"])
    data.add_argument("--tokenizer", required=True, help="tokenizer folder or hub name")
    data.add_argument("--max-seq-len", type=int, default=None)
    data.add_argument("--train-on-inputs", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            report = data_report(args.path, args.format, args.tokenizer, args.max_seq_len, args.train_on_inputs)
    except (DataFormatError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
