"""recipes_core.evaluate: lm-eval on the held-out sets, offline, on a converted folder, a checkpoint and a run
folder; a before/after table; bad input is one `error:` line and exit 2."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from conftest import DATA_DIR, exit_code

from recipes_core.evaluate import evaluate, main
from recipes_core.tokens import load_tokenizer

N = 24  # held-out chat prompts: enough that the fine-tuned model's gain is not one lucky answer


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def table_row(out: str, task: str, template: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if re.match(rf"{task}\s+\S+\s+{template}\s", line))


def test_before_after_table_on_the_quickstart_run(quickstart_run, tiny_models, tmp_path, capsys):
    """The quickstart's run folder against the instruct model it started from: the chat exact match rises,
    and the table says so with the numbers lm-eval measured."""
    run_dir = os.path.dirname(quickstart_run["checkpoint"])
    assert exit_code(main, [run_dir, "--baseline", str(tiny_models["instruct"]), "--data", str(DATA_DIR),
                            "--tasks", "rc_chat", "--limit", str(N), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    task, metric, template, n, before, after, change = table_row(out, "rc_chat", "on")
    assert (metric, int(n)) == ("exact_match", N)
    assert float(after) >= float(before) + 3 / N, out
    assert abs(float(after) - float(before) - float(change)) < 1e-3
    assert (tmp_path / "model" / "tasks" / "rc_chat.yaml").is_file() and (tmp_path / "results.json").is_file()


def test_checkpoint_folder_and_a_folder_with_one_stop_id_score_the_same(quickstart_run, tmp_path):
    """A checkpoint is rebuilt in memory and must answer exactly as its converted folder. A copy of that folder
    whose eos is the base model's <|end_of_text|> only (the config copied from the base model) must too:
    evaluate stops on every end id of the vocabulary, so the answers still end at <|eot_id|> instead of
    running on to the token limit (which no exact match survives)."""
    one_stop = tmp_path / "one_stop_id"
    shutil.copytree(quickstart_run["hf"], one_stop)
    end_of_text = load_tokenizer(one_stop).convert_tokens_to_ids("<|end_of_text|>")
    for name, key in (("generation_config.json", "eos_token_id"), ("config.json", "eos_token_id"),
                      ("tokenizer_config.json", "eos_token")):
        config = json.loads((one_stop / name).read_text())
        config[key] = "<|end_of_text|>" if key == "eos_token" else end_of_text
        (one_stop / name).write_text(json.dumps(config))
    options = dict(data_dir=DATA_DIR, tasks=["rc_chat"], limit=12, chat_template="on")
    scores = [evaluate(path, **options).get("rc_chat").value
              for path in (quickstart_run["checkpoint"], quickstart_run["hf"], one_stop)]
    assert scores[0] == scores[1] == scores[2] > 0, scores


@pytest.mark.parametrize("argv, needle", [
    (["{missing}"], "no such model folder"),
    (["{instruct}", "--data", "{empty}"], "no <name>_eval.jsonl file"),
    (["{instruct}", "--data", "{data}", "--tasks", "rc_nope"], "rc_nope: no such task"),
    (["{base}", "--data", "{data}", "--chat-template", "on"], "has no chat template"),
    (["{instruct}", "--data", "{bad}"], "row 2"),
    (["{instruct}", "--limit", "0"], "--limit 0: must be at least 1"),
])
def test_bad_input_is_one_error_line(argv, needle, tiny_models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "chat_eval.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": 3}\n')
    paths = dict(missing=tmp_path / "nope", instruct=tiny_models["instruct"], base=tiny_models["base"],
                 empty=tmp_path / "empty", data=DATA_DIR, bad=tmp_path / "bad")
    assert exit_code(main, [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err
