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
No process group is needed. Reading the checkpoint back into a model is recipes_core.checkpoint's
(load_model_from_checkpoint); this module writes the Hugging Face folder and verifies it. The folder is
written under a temporary name and renamed at the end (paths.written_atomically), so a folder named OUT
is always complete. OUT never replaces its own input: an OUT that is, holds or lies
inside the checkpoint, or that is another entry of its run folder (a step_<k>, `latest`), is refused
with or without --overwrite (check_output_location).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from recipes_core.checkpoint import (METADATA, base_model_folder, is_run_folder, load_model_from_checkpoint,
                                     select_checkpoint)
from recipes_core.errors import UserError, command
from recipes_core.models import reset_rotary_buffers
from recipes_core.paths import UnsafeOutputError, overlap, refuse_overlap, written_atomically
from recipes_core.tokens import generation_config, load_tokenizer
from recipes_core.portable import make_portable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class OutputExistsError(UserError, FileExistsError):
    """The output folder exists and --overwrite was not given."""


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
    ckpt_dir, _ = select_checkpoint(checkpoint)
    check_output_location(out_dir, ckpt_dir)  # before --overwrite may remove anything
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} exists; choose another folder or pass --overwrite")
    model, params, ckpt_dir = load_model_from_checkpoint(ckpt_dir)
    tokenizer = load_tokenizer(params["tokenizer"])
    is_lora = bool(params.get("lora"))
    if is_lora and lora == "merge":
        model = model.merge_and_unload()
    model.to(DTYPES[dtype])
    model.generation_config = generation_config(tokenizer, (params.get("model_source") or {}).get("hf_dir"))

    with written_atomically(out_dir) as tmp:  # OUT appears complete and verified, or not at all
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
