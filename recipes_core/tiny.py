"""Build the tiny Llama-3-style models offline and deterministically.

    python -m recipes_core.tiny [--out models/tiny] [--data DIR]

Writes two ordinary Hugging Face folders that AutoTokenizer / AutoModelForCausalLM load:
  base/      tokenizer without chat template, eos <|end_of_text|>, and the tiny LlamaForCausalLM
  instruct/  the same vocabulary and weights, a Llama 3 chat template, eos <|eot_id|> (end of turn)

As in the real Llama 3 families, base and instruct share one vocabulary byte for byte: only the chat
template and the stop tokens differ. The tokenizer is a byte-level BPE trained on the project's
generated corpus (recipes_core.synthetic_data, in memory: no files needed), with the Llama 3 pre-tokenizer
pattern and special tokens plus a dedicated pad token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS_BASE, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
PAD = "<|finetune_right_pad_id|>"  # the name Llama 3.1 uses for its dedicated pad token
SPECIAL_TOKENS = [BOS, EOS_BASE, START_HEADER, END_HEADER, EOT, PAD]

# Llama 3's pre-tokenizer split pattern (tiktoken cl100k style).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# The files the tokenizer is trained on, named rather than globbed: a dataset added later (reviews_*.jsonl,
# your own) must not change the vocabulary, and so every token id the notebooks show.
TOKENIZER_CORPUS = ("alpaca_train.jsonl", "chat_train.jsonl", "pawsx_train.jsonl")


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A few layers, small hidden size, grouped-query attention (4 query heads share 2 kv heads)."""
    settings = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    initializer_range=0.02)
    settings.update(overrides)
    return LlamaConfig(**settings)


def corpus_texts(data_dir: str | Path | None = None) -> list[str]:
    """Every string in the TOKENIZER_CORPUS train files, in a fixed order (the BPE merges depend on it).
    data_dir None: the rows recipes_core.synthetic_data generates (seed 0), the same rows as the files it
    writes, so the tokenizer is byte-identical either way."""
    texts: list[str] = []

    def collect(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for key in sorted(value):
                collect(value[key])
        elif isinstance(value, list):
            for item in value:
                collect(item)

    if data_dir is None:
        from recipes_core.synthetic_data import build_all

        generated = build_all(seed=0)
        rows = [row for name in TOKENIZER_CORPUS for row in generated[name]]
    else:
        files = [Path(data_dir) / name for name in TOKENIZER_CORPUS]
        missing = [str(path) for path in files if not path.exists()]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)}: missing; write them with "
                                    "`python -m recipes_core.synthetic_data --out DIR`, or pass no data folder")
        rows = []
        for path in files:
            with open(path, encoding="utf-8") as f:
                rows += [json.loads(line) for line in f]
    for row in rows:
        collect(row)
    # The prompt scaffolding the preprocessors add, so it gets merges too.
    from recipes_core.preprocess import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, CLASSIFICATION_PROMPT
    texts += [ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, CLASSIFICATION_PROMPT, "system", "user", "assistant"]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    # Appended after training so they sit at the end of the vocabulary, as in Llama 3.
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def wrap(tokenizer: Tokenizer, instruct: bool) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.__class__.from_str(tokenizer.to_str()),
                                 bos_token=BOS, eos_token=EOT if instruct else EOS_BASE, pad_token=PAD,
                                 model_max_length=512, padding_side="right", clean_up_tokenization_spaces=False)
    if instruct:
        hf.chat_template = LLAMA3_CHAT_TEMPLATE
    return hf


def build_tiny(out_dir: str | Path = "models/tiny", data_dir: str | Path | None = None,
               vocab_size: int = 1024, seed: int = 0, **model_overrides) -> dict[str, Path]:
    """Build base/ and instruct/ under out_dir; returns their paths. Same inputs, same bytes. The tokenizer
    is trained on data_dir's files, or (None) on the same rows generated in memory."""
    out = Path(out_dir)
    tokenizer = train_tokenizer(corpus_texts(data_dir), vocab_size)
    config = tiny_llama_config(tokenizer.get_vocab_size(), bos_token_id=tokenizer.token_to_id(BOS),
                               eos_token_id=tokenizer.token_to_id(EOS_BASE),
                               pad_token_id=tokenizer.token_to_id(PAD), **model_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    paths = {}
    for variant, instruct in (("base", False), ("instruct", True)):
        path = out / variant
        hf_tokenizer = wrap(tokenizer, instruct)
        hf_tokenizer.save_pretrained(path)
        eos_ids = [hf_tokenizer.convert_tokens_to_ids(t) for t in ((EOT, EOS_BASE) if instruct else (EOS_BASE,))]
        model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                                   eos_token_id=eos_ids if instruct else eos_ids[0],
                                                   pad_token_id=config.pad_token_id)
        model.config.eos_token_id = eos_ids if instruct else eos_ids[0]
        model.save_pretrained(path)
        paths[variant] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny Llama-3-style base and instruct models.")
    parser.add_argument("--out", default="models/tiny")
    parser.add_argument("--data", default=None, help="train the tokenizer on this folder's files (default: the "
                        "generated datasets, in memory)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for variant, path in build_tiny(args.out, args.data, args.vocab_size, args.seed).items():
        print(f"{variant}: {path}")


if __name__ == "__main__":
    main()
