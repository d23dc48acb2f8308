"""The tiny models: deterministic, loadable with plain transformers, base and instruct share a vocabulary."""

from __future__ import annotations

import hashlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from recipes_core.tiny import build_tiny
from recipes_core.tokens import end_token_ids

from conftest import DATA_DIR

TEXTS = ["Classify the sentiment of this review.", "tractor, cherry, park", "émoji ✓ and 1234567",
         "<|begin_of_text|>raw special text", "  leading spaces\n\nand newlines"]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic(tiny_models, tmp_path):
    again = build_tiny(tmp_path / "again", DATA_DIR)
    for variant in ("base", "instruct"):
        for name in ("tokenizer.json", "model.safetensors", "config.json"):
            assert digest(tiny_models[variant] / name) == digest(again[variant] / name), (variant, name)


def test_base_and_instruct_tokenizers_share_vocabulary(tiny_models):
    base = AutoTokenizer.from_pretrained(tiny_models["base"])
    instruct = AutoTokenizer.from_pretrained(tiny_models["instruct"])
    assert base.is_fast and instruct.is_fast
    assert base.get_vocab() == instruct.get_vocab()
    for text in TEXTS:
        assert base(text)["input_ids"] == instruct(text)["input_ids"]
    assert base.bos_token == instruct.bos_token == "<|begin_of_text|>"
    assert base.pad_token == instruct.pad_token == "<|finetune_right_pad_id|>"
    # only the chat template and the stop token differ
    assert base.eos_token == "<|end_of_text|>" and instruct.eos_token == "<|eot_id|>"
    assert not base.chat_template and instruct.chat_template
    for token in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(base(token, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders_llama3_format(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["instruct"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_model_loads_with_gqa_and_stop_tokens(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["instruct"])
    config = model.config
    assert config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["instruct"])
    generation = GenerationConfig.from_pretrained(tiny_models["instruct"])
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in generation.eos_token_id
    assert eot in end_token_ids(tokenizer, generation)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tokenizer))
