"""Load a Hugging Face folder with transformers 4.x and write what it computed (run by test_portable.py).

    PYTHONPATH=.tf4 python tests/tf4_load.py FOLDER OUT.pt

Runs in the `make tf4` environment: transformers 4.57 and its tokenizers / huggingface_hub in .tf4,
torch from the .venv. Loads the folder the way a 4.x user does (AutoTokenizer, AutoModelForCausalLM,
GenerationConfig, apply_chat_template) and saves the version, token ids, chat ids, generation config and
logits, for the test to compare with the transformers 5 load.
"""

import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

TEXTS = ["Give the first item of the list.", "Is this review positive or negative?\nthe soup was great"]


def main(folder: str, out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generation = GenerationConfig.from_pretrained(folder)
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True) for text in TEXTS]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([ids])).logits[0] for ids in chat]
    torch.save({"version": transformers.__version__, "file": transformers.__file__,
                "tokenizer_class": type(tokenizer).__name__, "ids": [tokenizer.encode(t) for t in TEXTS],
                "chat_ids": chat, "eos_token_id": generation.eos_token_id, "logits": logits,
                "rope_theta": model.config.rope_theta}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
