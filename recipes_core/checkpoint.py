"""Sharded checkpoints with torch.distributed.checkpoint (DCP): layout, atomic save, exact resume, sizes.

Format contract (other tools, e.g. conversion to a Hugging Face folder, rely on it exactly):

    <output_dir>/
      latest                   text file naming the last *complete* step folder (e.g. "step_20");
                               written last, atomically (write a temporary file, then rename)
      step_<k>/                k = optimizer steps done, a plain integer
        .metadata              DCP index: every tensor, its shards and where their bytes are
        __<rank>_<i>.distcp    the shards, one or more per rank
        train_params.yaml      how to rebuild the run (below)
        rng_rank<r>.pt         per-rank RNG states, only with save_optimizer (torch/numpy/python)
      .tmp_step_<k>/           a save in progress; renamed to step_<k> once every rank has written

DCP top-level keys:
  "model"      the model state dict with plain Hugging Face names, exactly as
               LlamaForCausalLM(config).state_dict() names them ("model.layers.0.self_attn.q_proj.weight",
               "lm_head.weight"), from get_model_state_dict on the FSDP model. For LoRA runs it holds only
               the adapter tensors, named as peft's get_peft_model_state_dict names them
               ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": no adapter name).
  with save_optimizer, also:
  "optim"      get_optimizer_state_dict (AdamW exp_avg, exp_avg_sq, step; keyed by parameter name)
  "scheduler"  the LR scheduler's state_dict
  "trainer"    {"step", "epoch", "batch_in_epoch" (micro-batches of this epoch already consumed),
                "tokens_seen", "supervised_tokens_seen"}

train_params.yaml keys: config (the resolved config dict), model_source ({kind: tiny|hf|hub|gguf, path,
hf_dir, tiny_variant}), model_config (HF config.to_dict()), tokenizer (local folder of the tokenizer used,
with its chat template), step, save_optimizer, lora (null or the peft LoraConfig fields), world_size,
param_dtype, and param_counts ({total, trainable, saved}: what the size report predicts from).
Tied weights (SmolLM2's lm_head = embed_tokens) appear under both names, as in state_dict(), and are
stored under both.

Nothing is written twice: the model shards are saved once, and the optimizer state once beside them (the
old llama-recipes saved the model again with the optimizer, plus a separate full optimizer file).
Loading never unpickles arbitrary objects: every torch.load here, and DCP's loading of non-tensor values,
uses weights_only=True (WeightsOnlyLoadPlanner).

Sizes: `python -m recipes_core.checkpoint size DIR` sets predicted bytes (4 B/param for fp32 weights,
8 B/trainable param for AdamW's two moments) against the files on disk;
`python -m recipes_core.checkpoint size --params 8B` does it on paper.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from recipes_core import faults
from recipes_core.safety import check_checkpoint_metadata, load_torch_file

LATEST = "latest"
TRAIN_PARAMS = "train_params.yaml"
METADATA = ".metadata"

# Parameter counts of common Llama sizes, for the on-paper report.
PAPER_MODELS = {"135M": 134_515_008, "1B": 1_235_814_400, "3B": 3_212_749_824, "7B": 6_738_415_616,
                "8B": 8_030_261_248, "70B": 70_553_706_496}
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


# ----- layout helpers (no process group needed) --------------------------------------------------------

def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"step_{step}"


def read_metadata(ckpt_dir: str | Path):
    """DCP's index of a checkpoint folder (a pickled `Metadata`: `state_dict_metadata` maps every saved key to
    its global shape and dtype, `storage_data` says which file holds which chunk), read with a restricted
    unpickler: a .metadata file from elsewhere must not run code. Raises if it is missing, damaged, or carries
    code. (dcp.load reads it again with plain pickle, so the recipes call this first.)"""
    return check_checkpoint_metadata(ckpt_dir)


def is_complete(ckpt_dir: str | Path) -> bool:
    """True when the folder has .metadata and every shard file it names, each long enough."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / METADATA).is_file():
        return False
    try:
        metadata = read_metadata(ckpt_dir)
    except Exception:
        return False
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return all((ckpt_dir / name).is_file() and (ckpt_dir / name).stat().st_size >= end
               for name, end in needed.items())


def find_latest(output_dir: str | Path) -> Path | None:
    """The step folder named by <output_dir>/latest if complete; else the highest complete step_<k>."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    if pointer.is_file():
        candidate = output_dir / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    steps = sorted((int(p.name.split("_")[1]), p) for p in output_dir.glob("step_*")
                   if p.name.split("_")[1].isdigit())
    for _, path in reversed(steps):
        if is_complete(path):
            return path
    return None


def load_train_params(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / TRAIN_PARAMS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {ckpt_dir} is not a checkpoint written by recipes_core.finetune")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new content, never half


def list_step_dirs(output_dir: str | Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("step_*") if p.name.split("_")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


# ----- RNG ---------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """torch/numpy/python RNG states as tensors and plain numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [kind, int(pos), int(has_gauss), float(gauss)], "python": list(random.getstate()[1]),
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----- save and load (every rank calls these) ----------------------------------------------------------

def _weights_only_planner():
    from torch.distributed.checkpoint._nested_dict import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner unpickles non-tensor values with weights_only=False; this one does not."""

        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return WeightsOnlyLoadPlanner()


def model_state(model, lora: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if lora:
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(model))  # adapter tensors only (DTensor shards)
    return get_model_state_dict(model)


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                    train_params: dict, save_optimizer: bool, keep_last_n: int = 0, lora: bool = False) -> Path:
    """Write <output_dir>/step_<step>/ via a temporary folder; update `latest` last; prune old steps."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    rank = dist.get_rank()
    output_dir = Path(output_dir)
    final, tmp = step_dir(output_dir, step), output_dir / f".tmp_step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()

    state = {"model": model_state(model, lora)}
    if save_optimizer:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
        state["scheduler"] = scheduler.state_dict()
        state["trainer"] = dict(trainer_state)
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    dcp.save(state, checkpoint_id=str(tmp))
    faults.in_save(step, rank, output_dir)  # test-only: RECIPES_FAULT_KILL_IN_SAVE (shards written, no rename)

    if rank == 0:
        (tmp / TRAIN_PARAMS).write_text(yaml.safe_dump(train_params, sort_keys=False), encoding="utf-8")
        if not is_complete(tmp):
            raise RuntimeError(f"{tmp}: DCP wrote an incomplete checkpoint")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _atomic_write_text(output_dir / LATEST, final.name + "\n")
        if keep_last_n > 0:
            for old in list_step_dirs(output_dir)[:-keep_last_n]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(ckpt_dir: str | Path, model, optimizer, scheduler, trainer_state: dict,
                    lora: bool = False) -> dict | None:
    """Restore what the folder holds into model (and optimizer, scheduler, RNG when saved); returns the
    trainer state (same keys as the trainer_state template given), or None for a model-only checkpoint."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    ckpt_dir = Path(ckpt_dir)
    metadata = read_metadata(ckpt_dir)  # raises if missing, damaged, or carrying code
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: not a complete checkpoint (shard files missing or short)")
    saved_keys = {key.split(".")[0] for key in metadata.state_dict_metadata}
    full = {"optim", "trainer", "scheduler"} <= saved_keys

    state = {"model": model_state(model, lora)}
    if full:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
        state["scheduler"] = scheduler.state_dict()
        state["trainer"] = dict(trainer_state)  # DCP loads only the keys the target dict has
    dcp.load(state, checkpoint_id=str(ckpt_dir), planner=_weights_only_planner())
    if not lora:  # get_model_state_dict may return copies (e.g. with CPU offload): set them back
        set_model_state_dict(model, state["model"])
    if not full:
        return None
    set_optimizer_state_dict(model, optimizer, state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = ckpt_dir / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(load_torch_file(rng_file))
    return state["trainer"]


# ----- sizes -------------------------------------------------------------------------------------------

def predict_sizes(n_params: int, n_trainable: int | None = None, param_bytes: int = 4,
                  optim_state_bytes: int = 8, save_optimizer: bool = True) -> dict[str, int]:
    """Predicted checkpoint bytes per component. Weights: n_params x param_bytes (4 for fp32).
    AdamW keeps exp_avg and exp_avg_sq per trainable parameter, in fp32: 8 bytes (optim_state_bytes).
    Totals: about 4 B/param model-only, 12 B/param with the optimizer (fp32, full fine-tuning)."""
    n_trainable = n_params if n_trainable is None else n_trainable
    sizes = {"model": n_params * param_bytes, "optim": n_trainable * optim_state_bytes if save_optimizer else 0}
    sizes["total"] = sizes["model"] + sizes["optim"]
    return sizes


def measured_sizes(ckpt_dir: str | Path) -> dict[str, int]:
    """Bytes per DCP top-level key (from .metadata), plus the files on disk in all."""
    ckpt_dir = Path(ckpt_dir)
    sizes: dict[str, int] = {}
    for index, info in read_metadata(ckpt_dir).storage_data.items():
        key = index.fqn.split(".")[0]
        sizes[key] = sizes.get(key, 0) + info.length
    sizes["files_on_disk"] = sum(p.stat().st_size for p in ckpt_dir.iterdir() if p.is_file())
    return sizes


def size_report(ckpt_dir: str | Path) -> dict:
    """Prediction from train_params.yaml (parameter counts) set against the bytes written."""
    params = load_train_params(ckpt_dir)
    counts = params.get("param_counts") or {}
    n_params, n_trainable = counts.get("saved"), counts.get("trainable")
    predicted = predict_sizes(n_params, n_trainable, DTYPE_BYTES.get(params.get("param_dtype", "fp32"), 4),
                              save_optimizer=bool(params.get("save_optimizer")))
    measured = measured_sizes(ckpt_dir)
    return {"dir": str(ckpt_dir), "n_params_saved": n_params, "n_trainable": n_trainable,
            "predicted": predicted, "measured": measured,
            "ratio_total": measured["files_on_disk"] / predicted["total"],
            "bytes_per_param": measured["files_on_disk"] / n_params}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_size_report(report: dict) -> str:
    p, m = report["predicted"], report["measured"]
    lines = [f"checkpoint {report['dir']}: {report['n_params_saved']:,} parameters saved, "
             f"{report['n_trainable']:,} trainable",
             f"  {'component':<10}{'predicted':>14}{'written':>14}",
             f"  {'model':<10}{_human(p['model']):>14}{_human(m.get('model', 0)):>14}",
             f"  {'optim':<10}{_human(p['optim']):>14}{_human(m.get('optim', 0)):>14}",
             f"  {'total':<10}{_human(p['total']):>14}{_human(m['files_on_disk']):>14}  (all files on disk)",
             f"  {report['bytes_per_param']:.3f} bytes/param on disk; on disk / predicted = {report['ratio_total']:.4f}"]
    return "\n".join(lines)


def format_paper_report(n_params: int, label: str = "") -> str:
    lines = [f"{label or f'{n_params:,} params'}: full fine-tuning, fp32 weights, AdamW"]
    for title, save_optimizer in (("model only", False), ("model + optimizer", True)):
        sizes = predict_sizes(n_params, save_optimizer=save_optimizer)
        lines.append(f"  {title:<18} {_human(sizes['total']):>12}  ({sizes['total'] / n_params:.0f} B/param)")
    bf16 = predict_sizes(n_params, param_bytes=2, save_optimizer=False)
    lines.append(f"  {'bf16 weights only':<18} {_human(bf16['total']):>12}  (2 B/param)")
    return "\n".join(lines)


def _parse_count(text: str) -> tuple[int, str]:
    if text.upper() in PAPER_MODELS:
        return PAPER_MODELS[text.upper()], text.upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("kKmMbB")) * scale), text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.checkpoint",
                                     description="checkpoint size report: predicted bytes against files on disk")
    commands = parser.add_subparsers(dest="command", required=True)
    size = commands.add_parser("size", help="report on a step_<k> folder, or on paper with --params")
    size.add_argument("dir", nargs="?", help="a step_<k> folder or an output dir (its latest step)")
    size.add_argument("--params", nargs="*", default=None,
                      help="parameter counts on paper, e.g. 7B 8B 70B or 1.5e9 (default: 7B 8B 70B)")
    args = parser.parse_args(argv)
    if args.dir:
        ckpt = Path(args.dir)
        if not (ckpt / METADATA).exists():
            ckpt = find_latest(ckpt)
            if ckpt is None:
                print(f"error: {args.dir}: no complete checkpoint", file=sys.stderr)
                return 2
        print(format_size_report(size_report(ckpt)))
    if args.params is not None or not args.dir:
        for text in args.params or ["7B", "8B", "70B"]:
            print(format_paper_report(*_parse_count(text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
