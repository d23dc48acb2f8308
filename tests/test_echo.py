"""'The fine-tuned model only repeats the prompt': each cause reproduced, with the check that catches it.

Causes (all seen together with the older Llama recipes): prompt labels not masked the way the model
needs, a base model used for chat, no chat template in the data path or saved with the model,
<|eot_id|> not a stop token, and decoding the prompt together with the answer. The last test shows
the correct setup (the quickstart's fine-tuned model and its data) passing every check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from recipes_core import IGNORE_INDEX
from recipes_core.checks import (check_answers, check_label_masks, check_model, check_model_setup,
                                 compare_tokenizers)
from recipes_core.data import load_records
from recipes_core.doctor import data_report
from recipes_core.doctor import main as doctor_main
from recipes_core.infer import NoChatTemplateError, generate
from recipes_core.preprocess import tokenize_records

PROMPT = "Give the first item of the list.\nbanana, cherry, saw, river"


@pytest.fixture(scope="module")
def tuned(quickstart_run):
    """The quickstart's converted, fine-tuned chat model: (folder, model, tokenizer)."""
    folder = Path(quickstart_run["hf"])
    return folder, AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _chat_examples(tokenizer, train_on_inputs=False):
    records = list(load_records(DATA_DIR / "chat_eval.jsonl", "chat"))[:40]
    return tokenize_records(records, "chat", tokenizer, train_on_inputs=train_on_inputs)


def test_cause_prompt_labels_not_masked(tiny_models, instruct_tokenizer):
    assert not check_label_masks(_chat_examples(instruct_tokenizer)).findings  # the correct masks

    unmasked = check_label_masks(_chat_examples(instruct_tokenizer, train_on_inputs=True))
    assert any("supervise their prompt" in w for w in unmasked.warnings)
    doctor = data_report(DATA_DIR / "chat_eval.jsonl", "chat", tiny_models["instruct"], train_on_inputs=True)
    assert any("supervise their prompt" in w for w in doctor.warnings)

    shifted = [{"input_ids": e["input_ids"], "labels": e["labels"][1:] + [IGNORE_INDEX]}
               for e in _chat_examples(instruct_tokenizer)]
    report = check_label_masks(shifted)
    assert not report.ok and "shifted by one" in report.errors[0]


def test_cause_base_model_used_for_chat(tiny_models, base_tokenizer, instruct_tokenizer):
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models["base"]))
    report = check_model_setup(base_tokenizer, base.generation_config)
    assert report.stats["kind"].startswith("base") and "no chat template" in report.warnings[0]
    with pytest.raises(NoChatTemplateError, match="completion"):
        generate(base, base_tokenizer, [PROMPT], mode="chat")
    # Same vocabulary as the instruct model: only the template and the stop token tell them apart.
    assert compare_tokenizers(base_tokenizer, instruct_tokenizer).stats["verdict"] == "same-vocabulary"
    # The data path refuses chat data without a template too (doctor data exits 2 with this message).
    with pytest.raises(ValueError, match="no chat_template"):
        data_report(DATA_DIR / "chat_eval.jsonl", "chat", tiny_models["base"])


def test_cause_chat_template_not_saved_with_the_model(tuned, tmp_path):
    folder, model, tokenizer = tuned
    stripped = _copy(folder, tmp_path)
    (stripped / "chat_template.jinja").unlink()
    config = json.loads((stripped / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (stripped / "tokenizer_config.json").write_text(json.dumps(config))
    without = AutoTokenizer.from_pretrained(str(stripped))

    assert any("no chat template" in w for w in check_model_setup(without, model.generation_config).warnings)
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        generate(model, without, [PROMPT], mode="chat")
    differences = compare_tokenizers(tokenizer, without)
    assert differences.stats["verdict"] == "same-vocabulary"
    assert any(f.message.startswith("chat template") for f in differences.findings)


def test_cause_end_of_turn_not_a_stop_token(tuned, tmp_path):
    folder, _, tokenizer = tuned
    broken = _copy(folder, tmp_path)
    settings = json.loads((broken / "generation_config.json").read_text())
    settings["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|end_of_text|>")  # the base model's eos only
    (broken / "generation_config.json").write_text(json.dumps(settings))
    model = AutoModelForCausalLM.from_pretrained(str(broken)).eval()

    report = check_model_setup(tokenizer, model.generation_config)
    assert not report.ok and "<|eot_id|>" in report.errors[0]

    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    with torch.no_grad():
        runs_on = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        fixed = GenerationConfig.from_dict({**settings, "eos_token_id": [eot], "max_new_tokens": 12})
        stops = model.generate(**inputs, generation_config=fixed)[0, inputs["input_ids"].shape[1]:]
    assert len(runs_on) == 12 and eot in runs_on[:-1].tolist()  # past the end of the turn, to the limit
    assert stops[-1].item() == eot and len(stops) < 12


def test_cause_prompt_decoded_with_the_answer(tuned):
    _, model, tokenizer = tuned
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    whole = tokenizer.decode(output[0], skip_special_tokens=True)  # the old inference script's decode
    new_only = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    caught = check_answers([PROMPT], [whole])
    assert not caught.ok and "repeat their prompt" in caught.errors[0]
    assert check_answers([PROMPT], [new_only]).ok
    assert generate(model, tokenizer, [PROMPT], max_new_tokens=12) == [new_only.strip()]


def test_correct_setup_passes_every_check(tuned, quickstart_run, capsys):
    folder, model, tokenizer = tuned
    report = check_model(model, tokenizer)
    assert report.ok and not report.warnings, str(report)
    data = data_report(DATA_DIR / "chat_train.jsonl", "chat", folder)
    assert data.ok and not data.warnings, str(data)
    assert doctor_main(["model", str(folder)]) == 0
    assert doctor_main(["checkpoint", quickstart_run["checkpoint"]]) == 0
    assert "FAILED" not in capsys.readouterr().out


def test_echo_detection_is_not_fooled_by_short_prompts_or_short_answers():
    from recipes_core.checks import repeats_prompt

    assert not repeats_prompt("hi", "this is a greeting")  # "hi" inside "this" is no echo
    assert repeats_prompt("hi", "Hi")
    assert not repeats_prompt(PROMPT, "banana")  # the right answer is a word of the prompt
    assert repeats_prompt(PROMPT, "of the list. banana, cherry, saw")  # a long stretch copied out of it
    assert not check_answers([PROMPT], [""]).ok  # an empty answer is an error too
