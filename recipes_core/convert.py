"""Turn a sharded training checkpoint into a Hugging Face folder that plain transformers loads.

    python -m recipes_core.convert CHECKPOINT OUT [--dtype fp32|bf16] [--lora merge|adapter]
                                   [--max-shard-size 2GB] [--verify] [--overwrite]

CHECKPOINT is a `step_<k>/` folder, or a run's output folder (its `latest` file names the step).
OUT receives safetensors weights (sharded with an index past --max-shard-size), config.json,
generation_config.json whose eos_token_id lists every end-of-sequence and end-of-turn id, and the
tokenizer files with the chat template, all taken from the checkpoint's train_params.yaml. The folder
loads in transformers 4.x as well as 5.x (recipes_core.portable).

Memory: the model is built on the meta device, materialised once, and the checkpoint's "model" entries
are read straight into those tensors (optimizer state in the same checkpoint is never read); the
weights are then written from those same tensors. Peak memory stays close to one copy of the model.
No process group is needed. The folder is written under a temporary name and renamed at the end, so
a folder named OUT is always complete. OUT never replaces its own input: an OUT that is, holds or lies
inside the checkpoint, or that is another entry of its run folder (a step_<k>, `latest`), is refused
with or without --overwrite (check_output_location).
"""

from __future__ import annotations

from recipes_core.errors import UserError, command

import argparse
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from recipes_core.checkpoint import (METADATA, TRAIN_PARAMS, CheckpointError, is_run_folder, load_train_params,
                                     read_metadata, require_complete, resolve_checkpoint)
from recipes_core.errors import UserError
from recipes_core.paths import UnsafeOutputError, overlap, refuse_overlap
from recipes_core.portable import make_portable
from recipes_core.models import build_model_from_config, reset_rotary_buffers, resolve_model_source
from recipes_core.tokens import end_token_ids, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class OutputExistsError(UserError, FileExistsError):
    """The output folder exists and --overwrite was not given."""


# ---------------------------------------------------------------- reading the checkpoint folder


def saved_model_entries(ckpt_dir: str | Path) -> dict:
    """{fqn inside "model": tensor metadata} for the tensors saved under the "model" key."""
    return {key[len("model."):]: meta for key, meta in read_metadata(ckpt_dir).state_dict_metadata.items()
            if key.startswith("model.")}


def _dcp_load_in_place(state_dict: dict[str, torch.Tensor], ckpt_dir: Path) -> None:
    """Read only these "model" entries into the given tensors, in one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        dcp.load({"model": state_dict}, checkpoint_id=str(ckpt_dir), no_dist=True)


# ---------------------------------------------------------------- rebuilding the model


def _meta_modules_by_size(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that still own unallocated (meta) tensors, largest first."""
    owners = [m for m in model.modules()
              if any(t.is_meta for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])]
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return sorted(owners, key=size, reverse=True)


def _load_full_model(ckpt_dir: Path, params: dict) -> PreTrainedModel:
    """Build the model on the meta device and read the checkpoint into it, allocating as it reads.

    DCP reads each tensor into a temporary of the same size before copying it into place. The largest
    tensors (embedding, lm_head) are allocated and read first, one by one, while the rest of the model
    is still on meta; then the rest is allocated and read in one pass. The peak is then about one copy
    of the model plus one decoder-layer tensor, not plus the largest tensor."""
    saved = saved_model_entries(ckpt_dir)
    dtype = next(iter(saved.values())).properties.dtype
    model = build_model_from_config(params["model_config"], device="meta", dtype=dtype).eval()
    # Tied: lm_head is the embedding (FSDP's state dict may list both names for the one tensor); read the
    # embedding only, as from_pretrained would, so the folder stores one copy and stays tied.
    tied = bool(model.config.tie_word_embeddings)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint's 'model' lacks {len(missing)} weights the "
                              f"model_config needs, e.g. {missing[:3]}; train_params.yaml and the shards "
                              "do not belong together")
    wrong = [f"{k}: {list(saved[k].size)} saved, {list(shape)} in model_config" for k, shape in expected.items()
             if tuple(saved[k].size) != shape]
    if wrong:
        raise CheckpointError(f"{ckpt_dir}: {len(wrong)} saved tensors do not have the shapes model_config gives "
                              f"(e.g. {wrong[0]}); train_params.yaml and the shards do not belong together")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    names = {id(m): name for name, m in model.named_modules()}
    while _meta_modules_by_size(model):
        largest = _meta_modules_by_size(model)[0]
        large = sum(p.numel() * p.element_size() for p in largest.parameters(recurse=False)) >= total // 20
        batch = [largest] if large else _meta_modules_by_size(model)
        for module in batch:
            module.to_empty(device="cpu", recurse=False)
        if tied:
            model.tie_weights()  # lm_head shares the embedding just allocated
        prefixes = tuple(f"{names[id(m)]}." if names[id(m)] else "" for m in batch)
        state = {k: v for k, v in model.state_dict().items() if k in expected and k.startswith(prefixes)}
        if state:
            _dcp_load_in_place(state, ckpt_dir)
    with torch.no_grad():
        reset_rotary_buffers(model, "cpu")
    return model


def base_model_folder(model_source: dict) -> Path:
    """The local Hugging Face folder the run started from (LoRA needs its weights)."""
    hf_dir = model_source.get("hf_dir")
    if not hf_dir or not Path(hf_dir).exists():
        hf_dir = resolve_model_source(model_source["kind"], model_source.get("path", ""),
                                      model_source.get("tiny_variant", "instruct"))["hf_dir"]
    return Path(hf_dir)


def _load_lora_model(ckpt_dir: Path, params: dict):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base_dir = base_model_folder(params["model_source"])
    dtype = next(iter(saved_model_entries(ckpt_dir).values())).properties.dtype
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    fields = {k: v for k, v in params["lora"].items() if k in LoraConfig.__dataclass_fields__}
    model = get_peft_model(base, LoraConfig(**fields))
    adapter = {key: value.clone() for key, value in get_peft_model_state_dict(model).items()}
    _dcp_load_in_place(adapter, ckpt_dir)
    set_peft_model_state_dict(model, adapter)
    return model.eval()


def load_model_from_checkpoint(checkpoint: str | Path):
    """(model, train_params, step folder) from a complete checkpoint, in one process.
    LoRA runs give a peft model around the base weights of model_source."""
    ckpt_dir = resolve_checkpoint(checkpoint)
    require_complete(ckpt_dir)
    params = load_train_params(ckpt_dir)
    for key in ("model_config", "tokenizer"):
        if not params.get(key):
            raise CheckpointError(f"{ckpt_dir}/{TRAIN_PARAMS}: field '{key}' is missing or empty")
    model = _load_lora_model(ckpt_dir, params) if params.get("lora") else _load_full_model(ckpt_dir, params)
    return model, params, ckpt_dir


# ---------------------------------------------------------------- tokenizer and generation config


def generation_config_for(tokenizer, model_source: dict | None = None) -> GenerationConfig:
    """The source model's generation config (if it has one) with eos_token_id set to every end id."""
    config = GenerationConfig()
    source = Path((model_source or {}).get("hf_dir", ""))
    if (source / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(str(source))
    config.eos_token_id = end_token_ids(tokenizer, config)
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id[0]
    return config


# ---------------------------------------------------------------- writing the folder


@dataclass
class ConvertResult:
    out_dir: Path
    checkpoint: Path
    step: int | None
    dtype: str
    files: list[str]
    max_abs_diff: float | None = None  # set by --verify

    def __str__(self) -> str:
        lines = [f"converted {self.checkpoint} (step {self.step}) -> {self.out_dir} ({self.dtype})",
                 "  files: " + ", ".join(self.files)]
        if self.max_abs_diff is not None:
            lines.append(f"  verify: max |logits difference| = {self.max_abs_diff:.3g}")
        return "\n".join(lines)


def _temporary_sibling(out_dir: Path) -> Path:
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder to its final name (replacing the old one if allowed)."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def check_output_location(out_dir: Path, ckpt_dir: Path) -> None:
    """Refuse an output that would replace or be written into the checkpoint or its run.

    Refused, with or without --overwrite: OUT is the checkpoint or lies inside it (the HF files would mix
    with the shards, or replace them); OUT contains the checkpoint (e.g. OUT is the run folder: --overwrite
    would delete every checkpoint, metrics.jsonl and config.yaml). Inside the run folder, OUT may be a new
    folder (the documented `convert runs/x runs/x/hf`) or one an earlier convert wrote (it holds
    config.json or adapter_config.json, and no checkpoint): that replaces nothing the run wrote. Anything
    else in the run folder (another step_<k>, a save in progress, latest, metrics.jsonl) is the run's."""
    refuse_overlap(out_dir, {"the checkpoint": ckpt_dir})
    run = ckpt_dir.resolve().parent
    if not is_run_folder(run) or overlap(out_dir, run) != "lies inside":
        return
    top = run / Path(out_dir).resolve().relative_to(run).parts[0]  # the run's entry OUT is in
    converted = (top / "config.json").is_file() or (top / "adapter_config.json").is_file()
    if top.exists() and not (top.is_dir() and converted and not (top / METADATA).exists()):
        raise UnsafeOutputError(f"the output {out_dir} would replace {top}, which belongs to the run {run}; "
                                f"choose a new folder (e.g. {run / 'hf'}) or one outside the run")


def convert(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", lora: str = "merge",
            max_shard_size: str | int = "2GB", verify: bool = False, overwrite: bool = False) -> ConvertResult:
    """Write a Hugging Face folder for `checkpoint`; see the module docstring."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if lora not in ("merge", "adapter"):
        raise ValueError(f"lora {lora!r}: choose 'merge' (one full model) or 'adapter' (a peft adapter folder)")
    out_dir = Path(out_dir)
    ckpt_dir = resolve_checkpoint(checkpoint)
    check_output_location(out_dir, ckpt_dir)  # before --overwrite may remove anything
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} exists; choose another folder or pass --overwrite")
    model, params, ckpt_dir = load_model_from_checkpoint(ckpt_dir)
    tokenizer = load_tokenizer(params["tokenizer"])
    is_lora = bool(params.get("lora"))
    if is_lora and lora == "merge":
        model = model.merge_and_unload()
    model.to(DTYPES[dtype])
    model.generation_config = generation_config_for(tokenizer, params.get("model_source"))

    tmp = _temporary_sibling(out_dir)
    try:
        if is_lora and lora == "adapter":
            model.peft_config["default"].base_model_name_or_path = str(base_model_folder(params["model_source"]))
            model.save_pretrained(str(tmp))
            model.base_model.model.generation_config.save_pretrained(str(tmp))
        else:
            model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        make_portable(tmp)  # transformers 4.x loads it too (tokenizer class name, rope keys)
        result = ConvertResult(out_dir, ckpt_dir, params.get("step"), dtype, sorted(p.name for p in tmp.iterdir()))
        if verify:  # a LoRA run is checked against a fresh, unmerged rebuild: that checks the merge too
            result.max_abs_diff = verify_conversion(tmp, ckpt_dir if is_lora else model, tokenizer)
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


# ---------------------------------------------------------------- verification


def sample_inputs(tokenizer, vocab_size: int) -> torch.Tensor:
    """A few real prompts (through the chat template when there is one) plus one random-id row."""
    texts = ["Give the first item of the list.", "Is this review positive or negative? the soup was great"]
    rows = []
    for text in texts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        else:
            ids = tokenizer.encode(text)
        rows.append(list(ids))
    generator = torch.Generator().manual_seed(0)
    rows.append(torch.randint(0, vocab_size, (24,), generator=generator).tolist())
    length = min(len(r) for r in rows)
    return torch.tensor([r[:length] for r in rows])


def _load_converted(out_dir: Path):
    if (out_dir / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)


@torch.no_grad()
def verify_conversion(out_dir: str | Path, reference, tokenizer=None, tolerance: float = 1e-5) -> float:
    """Load `out_dir` with plain AutoModelForCausalLM (AutoPeftModelForCausalLM for an adapter folder)
    and compare fp32 logits with `reference` (the model rebuilt from the checkpoint, or a checkpoint
    path to rebuild it from). Returns the max abs difference; raises when it exceeds `tolerance`."""
    out_dir = Path(out_dir)
    if not isinstance(reference, torch.nn.Module):
        reference, _, _ = load_model_from_checkpoint(reference)
    tokenizer = tokenizer or load_tokenizer(out_dir)
    converted = _load_converted(out_dir).eval()
    inputs = sample_inputs(tokenizer, converted.config.vocab_size)
    reference = reference.float()
    reset_rotary_buffers(reference, "cpu")  # a bf16 cast rounded them; from_pretrained keeps them in fp32
    expected = reference(input_ids=inputs).logits
    actual = converted(input_ids=inputs).logits
    diff = (expected - actual).abs().max().item()
    if not diff <= tolerance:
        raise AssertionError(f"{out_dir}: logits differ from the checkpoint's model by {diff:.3g} "
                             f"(tolerance {tolerance}); the conversion is wrong, do not use this folder")
    return diff


@command  # bad input (a damaged checkpoint, an existing output) -> one `error:` line, exit 2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="step_<k> folder, or a run folder with a `latest` file")
    parser.add_argument("out", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--lora", choices=["merge", "adapter"], default="merge",
                        help="LoRA runs: merge into the base weights, or write a peft adapter folder")
    parser.add_argument("--max-shard-size", default="2GB", help="weights past this size are split with an index")
    parser.add_argument("--verify", action="store_true", help="compare logits of the output with the checkpoint's")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = convert(args.checkpoint, args.out, args.dtype, args.lora, args.max_shard_size, args.verify,
                         args.overwrite)
    except AssertionError as err:  # --verify found different logits: a failed conversion, not bad input
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
