"""The quickstart: build the tiny models and data, then show one example with its label mask.

    python -m recipes_core.quickstart [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "cookbook"))

from make_datasets import write_all  # noqa: E402

from recipes_core.data import load_records  # noqa: E402
from recipes_core.preprocess import explain_labels, tokenize_alpaca  # noqa: E402
from recipes_core.tiny import build_tiny  # noqa: E402
from recipes_core.tokens import load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--data", default=str(REPO / "cookbook" / "data"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    print("[1/3] generating datasets ...")
    write_all(args.data)
    print("[2/3] building the tiny base and instruct models ...")
    paths = build_tiny(out / "models", args.data)
    tokenizer = load_tokenizer(paths["instruct"])
    record = load_records(Path(args.data) / "alpaca_train.jsonl", "alpaca")[0]
    example = tokenize_alpaca(record, tokenizer)
    print("[3/3] one Alpaca example, token by token (only the answer and its end token are learned):")
    print(explain_labels(example, tokenizer))
    print(f"\ndata: {args.data}\nmodels: {paths['base']} and {paths['instruct']}")


if __name__ == "__main__":
    main()
