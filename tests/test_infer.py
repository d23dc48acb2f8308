"""Inference: batches with left padding, every stop id, new tokens only, streaming, from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes_core.infer import generate, load_for_inference, main, read_prompts, render_prompts


@pytest.fixture(scope="module")
def tuned(quickstart_run):
    model, tokenizer = load_for_inference(quickstart_run["hf"])
    answered = [json.loads(line) for line in Path(quickstart_run["answers"]).read_text().splitlines()]
    return model, tokenizer, answered


def test_batches_with_left_padding_match_one_by_one(tuned):
    model, tokenizer, answered = tuned
    prompts = [a["prompt"] for a in answered[:6]]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # different lengths: padding happens
    batched = generate(model, tokenizer, prompts, batch_size=6, max_new_tokens=8)
    one_by_one = [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=8)[0] for p in prompts]
    assert batched == one_by_one
    assert all(a and "<|" not in a and "assistant" not in a for a in batched)  # new tokens, no special tokens
    assert tokenizer.padding_side == "right"  # generate() put the training side back


def test_from_a_checkpoint_equals_the_converted_folder(tuned, quickstart_run):
    model, tokenizer, answered = tuned
    prompts = [a["prompt"] for a in answered[:4]]
    from_checkpoint, checkpoint_tokenizer = load_for_inference(quickstart_run["checkpoint"])
    assert generate(from_checkpoint, checkpoint_tokenizer, prompts) == generate(model, tokenizer, prompts)


def test_chat_renders_the_template_and_completion_does_not(tuned):
    _, tokenizer, _ = tuned
    chat = render_prompts(tokenizer, ["hi"], "chat", system="Be brief.")[0]
    assert chat.startswith("<|begin_of_text|><|start_header_id|>system") and chat.endswith("assistant<|end_header_id|>\n\n")
    assert render_prompts(tokenizer, ["hi"], "completion") == ["hi"]


def test_sampling_is_reproducible_with_a_seed(tuned):
    model, tokenizer, answered = tuned
    prompts = [answered[0]["prompt"]]
    first = generate(model, tokenizer, prompts, do_sample=True, temperature=1.5, seed=3, max_new_tokens=6)
    assert first == generate(model, tokenizer, prompts, do_sample=True, temperature=1.5, seed=3, max_new_tokens=6)


def test_command_streams_one_prompt_and_batches_a_file(quickstart_run, tiny_models, tmp_path, capsys):
    answered = [json.loads(line) for line in Path(quickstart_run["answers"]).read_text().splitlines()]
    hit = next(a for a in answered if a["answer"] == a["expected"])
    assert main([quickstart_run["hf"], "--prompt", hit["prompt"]]) == 0
    streamed = capsys.readouterr().out
    assert streamed.count(hit["prompt"]) == 1  # the ">>>" line only: the streamer skips the prompt
    assert streamed.strip().endswith(hit["answer"])

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": a["prompt"]}) + "\n" for a in answered[:5]))
    assert len(read_prompts(prompts_file)) == 5
    assert main([quickstart_run["hf"], "--prompts-file", str(prompts_file), "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert all(a["answer"] in printed for a in answered[:5])

    with pytest.raises(SystemExit) as exit_info:  # chat with a base model: bad input, exit 2
        main([str(tiny_models["base"]), "--prompt", "hi"])
    assert exit_info.value.code == 2
    assert "no chat template" in capsys.readouterr().err
