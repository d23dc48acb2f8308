"""The quickstart end to end (a real 2-rank FSDP run, shared through the quickstart_run fixture), and
its converted folder used with nothing but plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from recipes_core.convert import main as convert_main

EOT = "<|eot_id|>"


def test_quickstart_improves_held_out_accuracy(quickstart_run):
    assert quickstart_run["eval_prompts"] == 100
    assert quickstart_run["accuracy_before"] <= 0.05
    assert quickstart_run["accuracy_after"] >= quickstart_run["accuracy_before"] + 0.25, quickstart_run
    assert quickstart_run["verify_max_abs_diff"] <= 1e-5
    answers = [json.loads(line) for line in Path(quickstart_run["answers"]).read_text().splitlines()]
    assert len(answers) == 100 and all(a["answer"] for a in answers)
    checkpoint = Path(quickstart_run["checkpoint"])
    assert (checkpoint / ".metadata").is_file() and len(list(checkpoint.glob("__*_*.distcp"))) == 2  # 2 ranks


def test_converted_folder_works_with_plain_transformers(quickstart_run):
    hf = quickstart_run["hf"]
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    answered = [json.loads(line) for line in Path(quickstart_run["answers"]).read_text().splitlines()]
    example = next(a for a in answered if a["answer"] == a["expected"])
    messages = [{"role": "user", "content": example["prompt"]}]

    # Plain generate with the folder's own generation_config stops at the end of the turn.
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
    assert new_tokens[-1] == tokenizer.convert_tokens_to_ids(EOT) and len(new_tokens) < 16
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    assert answer and example["prompt"] not in answer

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    reply = generator(messages, max_new_tokens=16, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip() == answer


def test_convert_command_on_a_finetune_checkpoint(quickstart_run, tmp_path, capsys):
    """The command on the trainer's own checkpoint (2 ranks, optimizer state saved), in bf16."""
    run_dir = Path(quickstart_run["checkpoint"]).parent
    assert convert_main([str(run_dir), str(tmp_path / "bf16"), "--dtype", "bf16", "--verify"]) == 0
    assert "max |logits difference| = 0" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16


def test_printed_infer_command_sends_a_real_newline(quickstart_run, capsys):
    """The `next:` command the quickstart prints, split into words by bash exactly as printed, gives infer
    the prompt with a real newline (the format of its training data), and the model the answer it gives
    to that prompt. (bash prints the words; infer's main then runs in this process on them, which saves
    a second interpreter start.)"""
    import subprocess

    from recipes_core.infer import generate, load_for_inference
    from recipes_core.infer import main as infer_main
    from recipes_core.quickstart import EXAMPLE_PROMPT, next_steps

    assert "\n" in EXAMPLE_PROMPT
    command = next_steps(quickstart_run).split("next: ", 1)[1].split("\n      python -m recipes_core.doctor")[0]
    words = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, text=True,
                           check=True).stdout.split("\0")[:-1]
    assert words[:3] == ["python", "-m", "recipes_core.infer"], words
    assert infer_main(words[3:]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f">>> {EXAMPLE_PROMPT}\n"), shown  # infer echoes the prompt it received
    model, tokenizer = load_for_inference(quickstart_run["hf"])
    expected = generate(model, tokenizer, [EXAMPLE_PROMPT], max_new_tokens=64)[0]
    assert shown[len(f">>> {EXAMPLE_PROMPT}\n"):].strip() == expected.strip()
