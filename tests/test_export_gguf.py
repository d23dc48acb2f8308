"""GGUF export read back by a real consumer, transformers' GGUF loader: logits within each weight type's
tolerance, the chat template, and the end-of-turn stop id as eos (the stop-token pitfall: a GGUF whose
eos is <|end_of_text|> runs on past <|eot_id|>). Bad input: one `error:` line, exit 2."""

from __future__ import annotations

import gguf
import pytest
import torch
from conftest import exit_code
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes_core.export_gguf import EOS_LIST_KEY, export_gguf
from recipes_core.export_gguf import main as export_main

# max |logits difference| / std of the logits; measured 0, 0.0025 and 0.054 on the tiny model (0.005 and
# 0.16 on SmolLM2-135M): each bound is a few times the rounding its weight type makes.
TOLERANCE = {"f32": 1e-6, "f16": 0.02, "q8_0": 0.25}
PROMPT = [{"role": "user", "content": "Give the first item of the list.\nmango, bridge, wolf"}]


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.fields[key]
    values = [field.parts[i].tolist() for i in field.data]
    return [v[0] if len(v) == 1 else v for v in values]


def test_round_trip_through_transformers(tiny_models, tmp_path):
    source = tiny_models["instruct"]
    reference = AutoModelForCausalLM.from_pretrained(str(source)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    eot, end_of_text = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits
    sizes = {}
    for kind, tolerance in TOLERANCE.items():
        name = f"tiny-{kind}.gguf"
        assert exit_code(export_main, [str(source), str(tmp_path / name), "--type", kind]) == 0
        sizes[kind] = (tmp_path / name).stat().st_size
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=name).eval()
        with torch.no_grad():
            actual = model(input_ids=torch.tensor([ids])).logits
        assert ((actual - expected).abs().max() / expected.std()).item() <= tolerance, kind
        assert model.generation_config.eos_token_id == eot, kind  # generate() stops at the end of the turn

        read = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=name)
        assert read.chat_template == tokenizer.chat_template
        assert read.eos_token == "<|eot_id|>"
        assert read.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False) == ids
        reader = gguf.GGUFReader(tmp_path / name)
        assert _field(reader, "tokenizer.ggml.eot_token_id") == [eot]
        assert _field(reader, EOS_LIST_KEY) == [eot, end_of_text]
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_bad_input_is_one_line(tiny_models, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert exit_code(export_main, [str(tmp_path / "missing"), str(out)]) == 2
    assert exit_code(export_main, [str(tiny_models["instruct"]), str(tmp_path / "model.bin")]) == 2
    out.write_bytes(b"keep me")
    assert exit_code(export_main, [str(tiny_models["instruct"]), str(out)]) == 2
    assert out.read_bytes() == b"keep me"  # nothing replaced without --overwrite
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors), errors
    assert "missing" in errors[0] and ".gguf" in errors[1] and "--overwrite" in errors[2]
    assert not list(tmp_path.glob(".*partial*"))
