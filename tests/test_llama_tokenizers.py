"""The real Llama 2 and Llama 3 tokenizers (llama.cpp's vocab-only GGUF files, `make llama-vocab`):
every stop id of Llama 3.1 Instruct, <|eom_id|> included, and the chat formats inside the base vocabularies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from transformers import GenerationConfig

from recipes_core.tokens import end_token_ids, gguf_tokenizer, load_tokenizer

LLAMA_VOCAB = Path(os.environ.get("LLAMA_VOCAB", REPO / "models" / "llama-vocab"))
LLAMA31_STOP_IDS = [128001, 128008, 128009]  # Llama-3.1-8B-Instruct's generation_config.json


def _vocab(name: str) -> Path:
    path = LLAMA_VOCAB / name
    if not path.exists():
        pytest.fail(f"{path} is missing; run `make llama-vocab`")
    return path


@pytest.fixture(scope="module")
def llama3():
    return gguf_tokenizer(_vocab("ggml-vocab-llama-bpe.gguf"))  # converted once, cached next to the file


def test_llama31_stop_ids_include_eom(llama3, tmp_path):
    # Llama 3.0's vocabulary: 128008 is a reserved slot; the generation config names it a stop id.
    assert llama3.convert_ids_to_tokens(128008) == "<|reserved_special_token_4|>"
    assert end_token_ids(llama3)[:2] == [128001, 128009]
    assert set(LLAMA31_STOP_IDS) <= set(end_token_ids(llama3, GenerationConfig(eos_token_id=LLAMA31_STOP_IDS)))

    # Llama 3.1's tokenizer is the same vocabulary with that slot named <|eom_id|> (and 128004 the pad):
    # end_token_ids finds it by name, without a generation config.
    folder = Path(shutil.copytree(llama3.name_or_path, tmp_path / "3.1"))
    for file in folder.iterdir():
        if file.suffix == ".json":
            text = file.read_text().replace("<|reserved_special_token_4|>", "<|eom_id|>")
            file.write_text(text.replace("<|reserved_special_token_2|>", "<|finetune_right_pad_id|>"))
    llama31 = load_tokenizer(folder)
    assert llama31.convert_tokens_to_ids("<|eom_id|>") == 128008
    assert set(LLAMA31_STOP_IDS) <= set(end_token_ids(llama31))
    assert llama31.convert_tokens_to_ids("<|finetune_right_pad_id|>") not in end_token_ids(llama31)


def test_chat_formats_fit_the_base_vocabularies(llama3):
    llama2 = gguf_tokenizer(_vocab("ggml-vocab-llama-spm.gguf"))
    assert (len(llama2), len(llama3)) == (32_000, 128_257)
    chat2 = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    ids2 = llama2(chat2, add_special_tokens=False)["input_ids"]
    assert ids2[0] == 1 and max(ids2) < 32_000 and llama2.unk_token_id not in ids2 and llama2.decode(ids2) == chat2
    chat3 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids3 = llama3(chat3, add_special_tokens=False)["input_ids"]
    assert {128000, 128006, 128007, 128009} <= set(ids3) and max(ids3) < 128_256


def test_gguf_tokenizer_names_the_make_target(tmp_path):
    with pytest.raises(FileNotFoundError, match="make llama-vocab"):
        gguf_tokenizer(tmp_path / "missing.gguf")
