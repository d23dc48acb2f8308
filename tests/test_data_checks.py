"""Data loading errors name the file, row and field; the data check rejects bad labels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from recipes_core import IGNORE_INDEX
from recipes_core.checks import check_tokenized
from recipes_core.data import DataFormatError, load_records
from recipes_core.doctor import data_report
from recipes_core.preprocess import tokenize_records
from recipes_core.tokens import end_token_ids

from conftest import DATA_DIR, REPO

GOOD = {"instruction": "Count the items.", "input": "a, b", "output": "two"}


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("fmt,bad_row,match", [
    ("alpaca", '{"instruction": "x", "output": ', r"row 2: invalid JSON"),
    ("alpaca", {"instruction": "Count.", "input": "a"}, r"row 2: field 'output' is missing"),
    ("alpaca", {"instruction": "Count.", "input": "a", "output": 2}, r"row 2: field 'output' should be str"),
    ("alpaca", {"instruction": "Count.", "input": "a", "output": "   "}, r"row 2: field 'output' is empty"),
    ("alpaca", '["not", "an", "object"]', r"row 2: expected a JSON object"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, r"row 2: field 'messages' has no assistant"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, r"row 2: field 'messages\[0\].role'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     r"row 2: field 'messages\[1\].content' is an empty assistant answer"),
    ("classification", {"sentence1": "a", "sentence2": "b", "label": "yes"}, r"row 2: field 'label' should be int"),
    ("classification", {"sentence1": "a", "sentence2": "b", "label": 3}, r"row 2: field 'label' is 3"),
])
def test_malformed_rows_name_file_row_and_field(tmp_path, fmt, bad_row, match):
    first = {"alpaca": GOOD, "chat": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
             "classification": {"sentence1": "a", "sentence2": "b", "label": 1}}[fmt]
    path = write_jsonl(tmp_path / "bad.jsonl", [first, bad_row])
    with pytest.raises(DataFormatError, match=match) as err:
        load_records(path, fmt)
    assert str(path) in str(err.value)


def test_json_array_and_parquet_load(tmp_path):
    rows = [GOOD, {**GOOD, "output": "three"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert load_records(tmp_path / "rows.json", "alpaca").to_list() == rows
    load_records(tmp_path / "rows.json", "alpaca").to_parquet(str(tmp_path / "rows.parquet"))
    assert load_records(tmp_path / "rows.parquet", "alpaca").to_list() == rows
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        load_records(tmp_path / "rows.csv", "alpaca")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_records(tmp_path / "missing.jsonl", "alpaca")


def test_generated_datasets_are_valid_and_disjoint():
    for name, fmt in [("alpaca", "alpaca"), ("chat", "chat"), ("pawsx", "classification"),
                      ("reviews", "classification")]:
        train = load_records(DATA_DIR / f"{name}_train.jsonl", fmt).to_list()
        evaluation = load_records(DATA_DIR / f"{name}_eval.jsonl", fmt).to_list()
        keys = {json.dumps(r, sort_keys=True) for r in train}
        assert not any(json.dumps(r, sort_keys=True) in keys for r in evaluation), name
    labels = [r["label"] for r in load_records(DATA_DIR / "pawsx_eval.jsonl", "classification")]
    assert 0.3 < sum(labels) / len(labels) < 0.7


def test_generator_is_deterministic(tmp_path):
    from recipes_core.synthetic_data import write_all

    for path in write_all(tmp_path):
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), path.name


def test_check_rejects_minus_one_and_out_of_range_labels(instruct_tokenizer):
    records = load_records(DATA_DIR / "alpaca_train.jsonl", "alpaca").select(range(5))
    examples = tokenize_records(records, "alpaca", instruct_tokenizer)
    ends, vocab = end_token_ids(instruct_tokenizer), len(instruct_tokenizer)
    assert check_tokenized(examples, vocab, ends).ok

    sentinel = [dict(e, labels=[-1 if l == IGNORE_INDEX else l for l in e["labels"]]) for e in examples]
    report = check_tokenized(sentinel, vocab, ends)
    assert not report.ok and any("never -1" in e and "rows 1, 2, 3, 4, 5" in e for e in report.errors)

    out_of_range = [dict(e) for e in examples]
    out_of_range[2] = dict(examples[2], labels=examples[2]["labels"][:-1] + [vocab])
    report = check_tokenized(out_of_range, vocab, ends)
    assert any("vocabulary size" in e and "rows 3" in e for e in report.errors)


def test_check_counts_unsupervised_truncated_and_unterminated(instruct_tokenizer):
    records = load_records(DATA_DIR / "alpaca_train.jsonl", "alpaca").select(range(4))
    examples = tokenize_records(records, "alpaca", instruct_tokenizer)
    examples[0] = tokenize_records(records.select([0]), "alpaca", instruct_tokenizer, max_seq_len=8)[0]
    examples[1] = dict(examples[1], labels=examples[1]["labels"][:-1] + [IGNORE_INDEX])  # eos unsupervised
    report = check_tokenized(examples, len(instruct_tokenizer), end_token_ids(instruct_tokenizer))
    assert report.ok  # warnings only
    assert report.stats["examples with no supervised token"] == 1
    assert report.stats["truncated examples"] == 1
    assert any("will not learn to stop" in w and "rows 2" in w for w in report.warnings)
    assert 0 < report.stats["supervised fraction"] < 0.2


def test_doctor_data_command(tiny_models, tmp_path, capsys):
    from recipes_core.doctor import main

    # Exit codes of the command's main(): 0 clean, 1 findings, 2 unreadable input (the real process below).
    assert main(["data", str(DATA_DIR / "chat_eval.jsonl"), "--format", "chat",
                 "--tokenizer", str(tiny_models["instruct"])]) == 0
    out = capsys.readouterr().out
    assert "supervised fraction" in out and "OK" in out

    tokenized = write_jsonl(tmp_path / "tok.jsonl", [{"input_ids": [1, 2, 3], "labels": [-1, 2, 3]}])
    assert main(["data", str(tokenized), "--format", "tokenized", "--tokenizer", str(tiny_models["instruct"])]) == 1
    assert "never -1" in capsys.readouterr().out

    broken = write_jsonl(tmp_path / "broken.jsonl", [GOOD, "{oops"])
    err = subprocess.run([sys.executable, "-m", "recipes_core.doctor", "data", str(broken), "--format", "alpaca",
                          "--tokenizer", str(tiny_models["instruct"])], capture_output=True, text=True)
    assert err.returncode == 2 and f"{broken}: row 2: invalid JSON" in err.stderr
    assert "Traceback" not in err.stderr


def test_data_report_function(tiny_models):
    report = data_report(DATA_DIR / "pawsx_eval.jsonl", "classification", tiny_models["base"])
    assert report.ok and report.stats["examples"] == 300
