"""Converted folders load in transformers 4.x as in 5.x: a 4.57 process (the `make tf4` environment)
loads a converted folder with AutoTokenizer, AutoModelForCausalLM, GenerationConfig and the chat
template, and gets the token ids, stop ids and logits the 5.x load gets. The model uses Llama 3's rotary
settings (rope_theta 500000, llama3 scaling): a 4.x that missed them would load without error and give
other logits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import REPO, write_checkpoint
from tf4_load import TEXTS
from transformers import AutoModelForCausalLM, GenerationConfig

from recipes_core.convert import convert
from recipes_core.tiny import tiny_llama_config
from recipes_core.tokens import load_tokenizer

TF4 = Path(os.environ.get("RECIPES_TF4_DIR", REPO / ".tf4"))
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def load_with_transformers_4(folder: Path, out: Path) -> dict:
    """Run tests/tf4_load.py with transformers 4.x first on the path (torch and the rest from this env)."""
    assert (TF4 / "transformers").is_dir(), f"{TF4} is missing; run `make tf4`"
    env = {**os.environ, "PYTHONPATH": str(TF4), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(REPO / "tests" / "tf4_load.py"), str(folder), str(out)], env=env,
                   check=True, cwd=out.parent)
    return torch.load(out, weights_only=True)


def test_converted_folder_loads_in_transformers_4(tiny_models, tmp_path):
    tokenizer = load_tokenizer(tiny_models["instruct"])
    config = tiny_llama_config(len(tokenizer), rope_parameters=dict(LLAMA3_ROPE))
    torch.manual_seed(0)
    write_checkpoint(AutoModelForCausalLM.from_config(config).eval(), tmp_path / "run", tiny_models["instruct"])
    folder = tmp_path / "hf"
    convert(tmp_path / "run", folder)

    v4 = load_with_transformers_4(folder, tmp_path / "v4.pt")
    assert v4["version"].startswith("4.") and str(TF4) in v4["file"]  # really 4.x, not this env's 5.x
    assert v4["tokenizer_class"] == "PreTrainedTokenizerFast"

    # The same load with this environment's transformers 5.
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert v4["ids"] == [tokenizer.encode(text) for text in TEXTS]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for text in TEXTS]
    assert v4["chat_ids"] == chat
    assert v4["eos_token_id"] == GenerationConfig.from_pretrained(str(folder)).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in v4["eos_token_id"]
    assert v4["rope_theta"] == LLAMA3_ROPE["rope_theta"]
    with torch.no_grad():
        for ids, logits in zip(chat, v4["logits"]):
            expected = model(input_ids=torch.tensor([ids])).logits[0]
            assert (expected - logits).abs().max().item() <= 1e-5
