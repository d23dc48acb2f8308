"""Write a Hugging Face Llama folder (e.g. convert's output) as one GGUF file for llama.cpp and Ollama.

    python -m recipes_core.export_gguf HF_DIR OUT.gguf [--type f32|f16|q8_0] [--overwrite]

Written with the `gguf` package's GGUFWriter (the writer llama.cpp's own convert_hf_to_gguf.py uses), in the
layout convert_hf_to_gguf.py gives Llama models: the same tensor names, q/k projections permuted to
llama.cpp's rotary layout, 1-D tensors (norms) kept in f32, Llama 3 rope scaling as a rope_freqs tensor.
convert_hf_to_gguf.py itself is not used because it refuses any BPE tokenizer whose pre-tokenizer hash it
does not know (the cookbook's tiny models, and most fine-tunes that add tokens).

The stop-token pitfall: a runtime stops where the GGUF says. A Llama 3 chat model ends its turn with
<|eot_id|>; a GGUF whose eos is the base model's <|end_of_text|> runs on past the answer. The file gets:
  tokenizer.ggml.eos_token_id  the tokenizer's eos (the end-of-turn token for a chat model),
  tokenizer.ggml.eot_token_id  <|eot_id|> (and eom_token_id <|eom_id|>) when in the vocabulary,
  recipes_core.eos_token_ids   every end id of generation_config.json (tokens.end_token_ids),
  tokenizer.chat_template      the folder's chat template.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from recipes_core.errors import UsageError, UserError, command
from recipes_core.models import check_model_folder
from recipes_core.tokens import end_token_ids, load_tokenizer

TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
EOS_LIST_KEY = "recipes_core.eos_token_ids"


class ExportError(UserError, ValueError):
    """A folder this exporter cannot write as GGUF (not a Llama model, no fast tokenizer)."""


# ---------------------------------------------------------------- tensors


def _permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k rows are in rotate-half order; llama.cpp's rope pairs adjacent rows (convert_hf_to_gguf's
    LlamaModel.permute). transformers' GGUF loader applies the inverse."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors for Llama 3 rope scaling, as convert_hf_to_gguf.py writes them (rope_freqs)."""
    base, factor = rope["rope_theta"], rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, file_type: gguf.LlamaFileType) -> None:
    data = tensor.detach().float().numpy()
    if data.ndim == 1 or file_type == gguf.LlamaFileType.ALL_F32:
        writer.add_tensor(name, data)  # norms stay f32, as in llama.cpp's conversion
    elif file_type == gguf.LlamaFileType.MOSTLY_F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


# ---------------------------------------------------------------- tokenizer


def _tokenizer_metadata(writer: gguf.GGUFWriter, folder: Path, tokenizer, generation_config) -> list[int]:
    """Vocabulary, merges, special ids and chat template. Returns every end id written."""
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ExportError(f"{folder / 'tokenizer.json'}: a {spec['model']['type']} tokenizer; this exporter writes "
                          "byte-level BPE tokenizers (Llama 3, SmolLM2, the tiny models)")
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for text, token_id in vocab.items():
        tokens[token_id] = text
    if None in tokens:
        raise ExportError(f"{folder}: the vocabulary has gaps in its ids; it cannot be written as a GGUF token list")
    special = {added["id"] for added in spec.get("added_tokens", []) if added.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")  # Llama 3's pre-tokenizer split pattern
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
        # What the HF tokenizer does on plain text (convert_hf_to_gguf.py writes the same for Llama 3).
        writer.add_add_bos_token(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])
    ends = end_token_ids(tokenizer, generation_config)
    writer.add_eos_token_id(ends[0])  # the tokenizer's own eos: the end of turn for a chat model
    if "<|eot_id|>" in vocab:
        writer.add_eot_token_id(vocab["<|eot_id|>"])
    if "<|eom_id|>" in vocab:
        writer.add_eom_token_id(vocab["<|eom_id|>"])
    writer.add_array(EOS_LIST_KEY, ends)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return ends


# ---------------------------------------------------------------- the file


def export_gguf(hf_dir: str | Path, out: str | Path, file_type: str = "f16", overwrite: bool = False) -> dict:
    """Write `hf_dir` as a GGUF file at `out` (written under a temporary name, renamed when complete).
    Returns a summary (type, tensors, eos ids, bytes)."""
    hf_dir, out = Path(hf_dir), Path(out)
    if file_type not in TYPES:
        raise UsageError(f"--type {file_type}: choose one of {', '.join(TYPES)}")
    check_model_folder(hf_dir)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; choose another file or pass --overwrite")
    if out.suffix != ".gguf":
        raise UsageError(f"{out}: the output file name must end in .gguf")
    config = AutoConfig.from_pretrained(str(hf_dir))
    if config.model_type != "llama":
        raise ExportError(f"{hf_dir / 'config.json'}: model_type {config.model_type!r}; this exporter writes "
                          "Llama-architecture models (model_type 'llama')")
    rope = dict(config.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ExportError(f"{hf_dir / 'config.json'}: rope_type {rope_type!r}; only default and llama3 rotary "
                          "embeddings are written")
    tokenizer = load_tokenizer(hf_dir)
    generation_config = (GenerationConfig.from_pretrained(str(hf_dir))
                         if (hf_dir / "generation_config.json").is_file() else None)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    ftype = TYPES[file_type]
    arch = gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(hf_dir.resolve().name)
    writer.add_file_type(ftype)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    ends = _tokenizer_metadata(writer, hf_dir, tokenizer, generation_config)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    if rope_type == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          _llama3_rope_factors(rope, head_dim))
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{hf_dir}: no GGUF name for the tensor {hf_name}")
        if hf_name.endswith("q_proj.weight"):
            tensor = _permute_for_llama_cpp(tensor, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _permute_for_llama_cpp(tensor, config.num_key_value_heads)
        _add_tensor(writer, name, tensor, ftype)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"out": str(out), "type": file_type, "tensors": len(state), "eos_token_ids": ends,
            "chat_template": bool(tokenizer.chat_template), "bytes": out.stat().st_size}


@command  # bad input -> one `error:` line, exit 2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.export_gguf", description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", help="a Hugging Face Llama folder (convert's output)")
    parser.add_argument("out", help="the .gguf file to write")
    parser.add_argument("--type", choices=list(TYPES), default="f16", help="weight type (norms stay f32)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    summary = export_gguf(args.hf_dir, args.out, args.type, args.overwrite)
    print(f"wrote {summary['out']} ({summary['type']}, {summary['tensors']} tensors, {summary['bytes']:,} bytes); "
          f"stop ids {summary['eos_token_ids']}, chat template {'yes' if summary['chat_template'] else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
