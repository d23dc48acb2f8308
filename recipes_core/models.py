"""Where models come from: the tiny factory, a local Hugging Face folder, a hub name, or a GGUF file.

Every source is first turned into a *local Hugging Face folder* (config.json, safetensors, tokenizer with
its chat template), once, on one process:
  tiny  -> recipes_core.tiny.build_tiny(path) and its base/ or instruct/ folder
  gguf  -> gguf_to_hf(file): transformers dequantizes the GGUF (~30 s for 135M parameters), the weights are
           copied into a plain LlamaForCausalLM and saved; the folder is reused on the next run
  hf    -> the folder itself
  hub   -> its folder in the Hugging Face cache (hub_folder: downloaded once, needs the network that time)

A model_source is the small dict that says how to get the model back; it is stored in every
checkpoint's train_params.yaml: {"kind": ..., "path": what the user gave, "hf_dir": the local folder or
hub name actually loaded, "tiny_variant": ...}.

Every source ends as safetensors files in a local folder, so the trainer never loads the full weights
anywhere: it builds the model on the meta device from the config (build_model_from_config), shards it, and
each rank reads only its own rows of each tensor (safetensors_weights, then
distributed.load_sharded_weights). Only a folder or hub repo with nothing but *.bin weights is loaded the
old way: rank 0 reads the full model (load_full_model) and broadcasts it shard by shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from recipes_core.paths import refuse_overlap, written_atomically
from recipes_core.errors import UserError
from recipes_core.tokens import load_tokenizer

DEFAULT_TINY_DIR = "runs/cache/tiny"
GGUF_MARKER = "converted_from_gguf.json"
# Config entries that describe where weights came from, not the architecture: a GGUF load leaves
# quantization_config behind, and a folder saved with it would be mistaken for a quantized model.
NOT_ARCHITECTURE = ("quantization_config", "_model_name_or_path", "_name_or_path")


class ModelFolderError(UserError, ValueError):
    """A Hugging Face model folder that cannot be loaded: no or damaged config.json, damaged weights."""


def model_folder_errors(folder: str | Path) -> list[str]:
    """What makes a local Hugging Face folder unloadable, found by reading only config.json and the
    safetensors headers (milliseconds), before any weight is loaded."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        return [f"{folder}: not a Hugging Face model folder (no config.json); point at a folder written by "
                "save_pretrained"]
    errors = []
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            errors.append(f"{config}: not a JSON object; the file is damaged: copy the model folder again")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        errors.append(f"{config}: not valid JSON ({err}); the file is damaged (cut off?): copy the model folder "
                      "again or save_pretrained it again")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("*.bin")):
        errors.append(f"{folder}: no weights (*.safetensors); save the model with save_pretrained")
    for file in weights:
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            errors.append(f"{file}: not a readable safetensors file ({err}); the file is damaged (cut off?): copy "
                          "it again")
    return errors


def check_model_folder(folder: str | Path) -> None:
    errors = model_folder_errors(folder)
    if errors:
        raise ModelFolderError(errors[0])


# ----- sources -> local folders ------------------------------------------------------------------------

def ensure_tiny(out_dir: str | Path = DEFAULT_TINY_DIR) -> dict[str, Path]:
    """The tiny base/instruct folders under out_dir, built once (build_tiny is deterministic)."""
    out = Path(out_dir)
    paths = {variant: out / variant for variant in ("base", "instruct")}
    if all((p / "model.safetensors").exists() and (p / "tokenizer.json").exists() for p in paths.values()):
        return paths
    from recipes_core.tiny import build_tiny

    with written_atomically(out) as tmp:  # another process sees either nothing or the complete folders
        build_tiny(tmp)
    return paths


def _gguf_fingerprint(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def default_gguf_hf_dir(gguf_path: str | Path) -> Path:
    gguf_path = Path(gguf_path)
    return gguf_path.parent / f"{gguf_path.stem}.hf"


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Write a plain Hugging Face folder (fp32 safetensors, config, generation_config, tokenizer with its
    chat template) for a Llama-architecture GGUF file; reuse it when it already exists for that file.

    transformers dequantizes GGUF weights on load but cannot save_pretrained the result directly, so the
    tensors are copied into a freshly built model of the same config, which saves like any other."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file (for SmolLM2 run `make smollm2`)")
    out = Path(out_dir) if out_dir else default_gguf_hf_dir(gguf_path)
    refuse_overlap(out, {"the GGUF file": gguf_path}, "the converted folder")  # replaced below
    marker = out / GGUF_MARKER
    fingerprint = _gguf_fingerprint(gguf_path)
    if not force and marker.exists() and json.loads(marker.read_text()) == fingerprint:
        return out

    from transformers import AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = loaded.config
    model = build_model_from_config(config.to_dict(), device="cpu")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]:
        raise RuntimeError(f"{gguf_path}: GGUF tensors do not match the config: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)

    with written_atomically(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_MARKER).write_text(json.dumps(fingerprint))  # written last: the folder is complete
    return out


# The files of a hub repo that training reads: not the `original/*.pth` checkpoints some repos carry beside the
# safetensors (Meta's Llama repos: a second full copy of the weights).
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.py"]


def hub_folder(name: str) -> str:
    """A hub model as its local folder in the Hugging Face cache (downloaded once; found there without the
    network when HF_HUB_OFFLINE=1), so that each rank can read its own rows of its safetensors files like
    any other folder. A repo without safetensors (only *.bin) stays the name: from_pretrained loads it."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(str(name), allow_patterns=HUB_FILES))
    return str(folder) if list(folder.glob("*.safetensors")) else str(name)


def resolve_model_source(kind: str, path: str = "", tiny_variant: str = "instruct") -> dict:
    """Materialize the source as a local HF folder (call on one process, then barrier) and return the
    model_source dict that train_params.yaml stores."""
    if kind == "tiny":
        paths = ensure_tiny(path or DEFAULT_TINY_DIR)
        hf_dir = str(paths[tiny_variant])
    elif kind == "gguf":
        hf_dir = str(gguf_to_hf(path))
    elif kind == "hf":
        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        hf_dir = str(path)
    elif kind == "hub":
        hf_dir = hub_folder(path)
        if hf_dir == str(path):  # no safetensors in the repo: from_pretrained(name) on rank 0
            return {"kind": kind, "path": str(path), "hf_dir": hf_dir, "tiny_variant": tiny_variant}
    else:
        raise ValueError(f"unknown model source {kind!r}; use tiny, hf, hub or gguf")
    # Absolute, so that a checkpoint's train_params.yaml works from any working directory.
    return {"kind": kind, "path": str(path), "hf_dir": str(Path(hf_dir).resolve()), "tiny_variant": tiny_variant}


# ----- building and loading ----------------------------------------------------------------------------

def build_model_from_config(model_config_dict: dict, device: str | torch.device = "meta",
                            dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """An untrained model of this config. On "meta" no memory is allocated (the trainer fills the
    weights after sharding); on "cpu" the weights are randomly initialised."""
    config_dict = {k: v for k, v in model_config_dict.items() if k not in NOT_ARCHITECTURE}
    config = AutoConfig.for_model(config_dict.pop("model_type", "llama"), **config_dict)
    config.dtype = dtype
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def reset_rotary_buffers(model: torch.nn.Module, device: torch.device | str) -> None:
    """Recompute the rotary embedding's inv_freq buffers. They are non-persistent (in no state dict), so
    after a meta-device build and to_empty() they hold garbage and must be computed again."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(module.config).to(device)
            for name, buffer in fresh.named_buffers(recurse=False):
                module.register_buffer(name, buffer, persistent=False)


class SafetensorsTensor:
    """One tensor of a safetensors file, read on demand: `tensor[a:b]` reads rows a..b, in the file's dtype,
    and nothing else. The file is opened for each read, not once for the whole load: safetensors maps it
    into memory, and every page a read touched counts in the process's RSS for as long as the mapping
    lives, which would add this rank's share of the file to its peak."""

    def __init__(self, file: Path, name: str):
        self.file, self.name = file, name

    def __getitem__(self, index) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.file), "pt") as handle:
            return handle.get_slice(self.name)[index]


def safetensors_weights(hf_dir: str | Path) -> dict[str, SafetensorsTensor]:
    """{name: SafetensorsTensor} for the folder's safetensors weights: model.safetensors, or the files
    model.safetensors.index.json names (a checkpoint in several files); {} when there are none (a folder
    of *.bin, a hub repo without safetensors). Reads only the files' headers."""
    from safetensors import safe_open

    folder = Path(hf_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    weights = {}
    for file in files:
        with safe_open(str(folder / file), "pt") as handle:
            weights.update((name, SafetensorsTensor(folder / file, name)) for name in handle.keys())
    return weights


def load_full_model(hf_dir: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """The whole model in fp32 on CPU; its state_dict() has the plain Hugging Face names (tied lm_head
    included). In training only rank 0 calls this, and only where the weights are not in safetensors files."""
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, trust_remote_code=trust_remote_code)


def load_model_config(hf_dir: str | Path, trust_remote_code: bool = False) -> dict:
    return AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code).to_dict()


def load_model_and_tokenizer(model_source: dict, device: str = "cpu", dtype: torch.dtype = torch.float32,
                             tokenizer_path: str | None = None):
    """(model, tokenizer) from a model_source dict (as stored in train_params.yaml), on one process."""
    if "hf_dir" not in model_source or not Path(str(model_source["hf_dir"])).exists():
        model_source = resolve_model_source(model_source["kind"], model_source.get("path", ""),
                                            model_source.get("tiny_variant", "instruct"))
    hf_dir = model_source["hf_dir"]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device)
    tokenizer = load_tokenizer(tokenizer_path or hf_dir)
    return model, tokenizer
