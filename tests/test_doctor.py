"""doctor tokenizers / checkpoint / model: verdicts, completeness, contents and sizes, exit codes."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import write_checkpoint
from transformers import AutoModelForCausalLM

from recipes_core.checks import check_checkpoint, compare_tokenizers
from recipes_core.doctor import main


def test_tokenizer_verdicts(base_tokenizer, instruct_tokenizer, smollm2_tokenizer):
    assert compare_tokenizers(instruct_tokenizer, instruct_tokenizer).stats["verdict"] == "identical"

    same = compare_tokenizers(base_tokenizer, instruct_tokenizer)
    assert same.ok and same.stats["verdict"] == "same-vocabulary"
    listed = " | ".join(f.message for f in same.findings)
    assert "chat template" in listed and "eos: A '<|end_of_text|>', B '<|eot_id|>'" in listed

    different = compare_tokenizers(instruct_tokenizer, smollm2_tokenizer)
    assert different.stats["verdict"] == "different" and not different.ok
    assert any(message.startswith("vocabulary:") for message in different.errors)


def test_tokenizers_command(tiny_models, capsys):
    assert main(["tokenizers", str(tiny_models["base"]), str(tiny_models["instruct"])]) == 0
    assert "verdict: same-vocabulary" in capsys.readouterr().out


def test_checkpoint_report_from_a_finetune_run(quickstart_run):
    report = check_checkpoint(Path(quickstart_run["checkpoint"]).parent)  # the run folder: follows `latest`
    assert report.ok, str(report)
    assert report.stats["holds"] == "model, optim, scheduler, trainer"
    assert report.stats["world size"] == 2 and report.stats["step"] == quickstart_run["steps"]
    assert 0.9 < report.stats["written / predicted"] < 1.1


def test_checkpoint_report_model_only_and_incomplete(tiny_models, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"]))
    ckpt = write_checkpoint(model, tmp_path / "run", tiny_models["instruct"], step=5)
    report = check_checkpoint(ckpt)
    assert report.ok and report.stats["holds"] == "model" and report.stats["step"] == 5

    broken = Path(shutil.copytree(ckpt, tmp_path / "broken"))
    shard = next(broken.glob("__*_*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    report = check_checkpoint(broken)
    assert not report.ok and shard.name in report.errors[0]
    (broken / ".metadata").unlink()
    assert main(["checkpoint", str(broken)]) == 1
    assert ".metadata is missing" in capsys.readouterr().out


def test_model_command_flags_a_model_that_stops_at_once(tiny_models, tmp_path, capsys):
    """A model that answers <|eot_id|> to everything (as one trained with only the end token supervised
    would) gives empty answers: the echo test of `doctor model` fails it."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"]))
    eot = model.generation_config.eos_token_id[0]
    with torch.no_grad():  # every hidden state the same positive vector; only <|eot_id|> scores it
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[eot] = 1.0
    silent = tmp_path / "silent"
    model.save_pretrained(silent)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_models["instruct"] / name, silent)
    assert main(["model", str(silent)]) == 1
    assert "empty answers to prompts 1, 2, 3" in capsys.readouterr().out
