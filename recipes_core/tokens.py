"""Tokenizer loading and the end-of-sequence / end-of-turn ids that generation must stop on."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from recipes_core.errors import UserError

# Tokens that end a sequence or a turn in the Llama 3 family and in ChatML-style models (SmolLM2,
# Qwen). Looked up by text in the tokenizer's vocabulary, never by a hard-coded id.
END_TOKEN_TEXTS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>")


# Files one of which a local tokenizer folder must have: the fast tokenizer's tokenizer.json, or the files a
# slow one is converted from (sentencepiece model, BPE vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


class TokenizerError(UserError, ValueError):
    """A tokenizer folder without its files, or with a damaged tokenizer.json."""


def tokenizer_folder_error(folder: str | Path) -> str | None:
    """Why a local folder cannot give a tokenizer (None when it can, or when it is a hub name)."""
    folder = Path(folder)
    if not folder.exists() and str(folder).startswith(("/", ".", "~")):
        return f"{folder}: no such tokenizer folder; check the path"
    if not folder.is_dir():
        return None  # a hub name: from_pretrained resolves it
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        return (f"{folder}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files of "
                "the model these weights came from into it (tokenizer.save_pretrained), or point at the folder "
                "that has them (model.tokenizer=...)")
    if present[0] == "tokenizer.json":
        try:
            json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return (f"{folder / 'tokenizer.json'}: not valid JSON ({err}); the file is damaged (cut off?): copy it "
                    "again or save the tokenizer again")
    return None


def load_tokenizer(path_or_name: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the fast (Rust) tokenizer through AutoTokenizer; a slow one is an error, not a fallback."""
    problem = tokenizer_folder_error(path_or_name)
    if problem:
        raise TokenizerError(problem)
    tokenizer = AutoTokenizer.from_pretrained(str(path_or_name), use_fast=True,
                                              trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise TokenizerError(f"{path_or_name}: AutoTokenizer returned a slow tokenizer; the recipes need the "
                         "fast one (offset mappings for label masks). Install `tokenizers` or convert it.")
    return tokenizer


def end_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config=None) -> list[int]:
    """Every id that ends a sequence or a turn: eos, the generation config's eos list, and the known
    end tokens that exist in this vocabulary. Generation must stop on all of them."""
    ids: list[int] = []

    def add(token_id):
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))

    add(tokenizer.eos_token_id)
    if generation_config is not None and generation_config.eos_token_id is not None:
        eos = generation_config.eos_token_id
        for token_id in eos if isinstance(eos, (list, tuple)) else [eos]:
            add(token_id)
    vocab = tokenizer.get_vocab()
    for text in END_TOKEN_TEXTS:
        if text in vocab:
            add(vocab[text])
    return ids


def generation_config(tokenizer: PreTrainedTokenizerBase, base=None):
    """The one place generation's stop, bos and pad ids are set (convert writes the result as
    generation_config.json; infer generates with it). A copy of `base` (a GenerationConfig, or a model
    folder whose generation_config.json is read when it has one) with eos_token_id = every end id
    (end_token_ids), bos from the tokenizer, and pad = the tokenizer's pad token, else the first end id."""
    from transformers import GenerationConfig

    if isinstance(base, GenerationConfig):
        config = GenerationConfig.from_dict(base.to_dict())
    elif base and (Path(base) / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(str(base))
    else:
        config = GenerationConfig()
    config.eos_token_id = end_token_ids(tokenizer, config)
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id[0]
    return config


def gguf_tokenizer(gguf_path: str | Path, out_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The fast tokenizer stored in a GGUF file (a model, or one of llama.cpp's vocab-only files).

    transformers rebuilds it from the GGUF vocabulary in Python, which takes tens of seconds for Llama 3's
    128k tokens; the result is saved once to `out_dir` (default: `<file name without .gguf>.tokenizer/`
    next to the file) and loaded from there afterwards."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file (for the Llama vocabularies run `make llama-vocab`)")
    out = Path(out_dir) if out_dir else gguf_path.with_suffix(".tokenizer")
    if not (out / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(str(out))
    return load_tokenizer(out)
