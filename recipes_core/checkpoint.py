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

A checkpoint is complete when every file it needs is there and parses: train_params.yaml (a YAML
mapping), .metadata (through the restricted unpickler) and every shard .metadata names, at least as long
as it says (`incomplete_reasons`). Which checkpoint a command loads is `select_checkpoint`'s one rule:
resume=auto takes the folder `latest` names if complete, else the highest complete step_<k>, and warns
naming each file that made it pass one over (`choose_latest`); a folder given by path (resume=<path>,
convert, infer, doctor) that is not complete is an error naming the file.

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

train_params.yaml keys: config (the resolved config dict; its data.chat_date is the date chat templates
rendered in this run, re-used on resume), model_source ({kind: tiny|hf|hub|gguf, path,
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
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from recipes_core import faults
from recipes_core.errors import UsageError, UserError, command
from recipes_core.paths import publish_folder, write_text_atomically
from recipes_core.safety import UnsafeCheckpointError, check_checkpoint_metadata, load_torch_file
from recipes_core.torch_internals import weights_only_load_planner

LATEST = "latest"
TRAIN_PARAMS = "train_params.yaml"
METADATA = ".metadata"

# Parameter counts of common Llama sizes, for the on-paper report.
PAPER_MODELS = {"135M": 134_515_008, "1B": 1_235_814_400, "3B": 3_212_749_824, "7B": 6_738_415_616,
                "8B": 8_030_261_248, "70B": 70_553_706_496}
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


# ----- layout and completeness (no process group needed) ----------------------------------------------
# This module owns the checkpoint folder: convert, preflight, doctor and finetune ask it whether a folder
# is complete and which one to resume from, so "complete" means the same thing everywhere.

class CheckpointError(UserError, RuntimeError):
    """The checkpoint folder is incomplete, damaged, or does not hold what train_params.yaml says."""


def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"step_{step}"


def tmp_step_dir(output_dir: str | Path, step: int) -> Path:
    """Where step_<k> is written until every rank has finished (then renamed; never resumed from)."""
    return Path(output_dir) / f".tmp_step_{step}"


def remove_unfinished_saves(output_dir: str | Path) -> list[Path]:
    """Remove the .tmp_step_<k> folders of saves that never finished (a crash between writing the shards
    and the rename) and return them. Call it on one rank, before the run saves anything."""
    stale = sorted(Path(output_dir).glob(".tmp_step_*"))
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def step_number(path: str | Path) -> int | None:
    """k for a folder named step_<k> (k a plain integer), else None."""
    prefix, _, number = Path(path).name.partition("_")
    return int(number) if prefix == "step" and number.isdigit() else None


def list_step_dirs(output_dir: str | Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("step_*") if step_number(p) is not None]
    return sorted(found, key=step_number)


def read_metadata(ckpt_dir: str | Path):
    """DCP's index (a pickled Metadata object), read with a restricted unpickler: a .metadata file from
    elsewhere must not run code. dcp.load reads it again with plain pickle, so this check comes first."""
    return check_checkpoint_metadata(ckpt_dir)


def shard_sizes(ckpt_dir: str | Path) -> dict[str, int]:
    """{shard file: bytes .metadata says it holds at least}."""
    needed: dict[str, int] = {}
    for info in (read_metadata(ckpt_dir).storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return needed


def load_train_params(ckpt_dir: str | Path) -> dict:
    """train_params.yaml as a dict; CheckpointError naming the file when it is missing or damaged (not
    UTF-8, not YAML, or YAML that is not a mapping: a save interrupted or a file edited by hand)."""
    path = Path(ckpt_dir) / TRAIN_PARAMS
    damaged = "the checkpoint is damaged: use an earlier step_<k> folder"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (model config and tokenizer are read from it); {ckpt_dir} is "
                              "not a checkpoint written by recipes_core.finetune")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {err.start}); {damaged}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise CheckpointError(f"{path} is not valid YAML ({problem}{line}); {damaged}") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} holds a {type(params).__name__}, not the mapping recipes_core.finetune "
                              f"writes; {damaged}")
    return params


def incomplete_reasons(ckpt_dir: str | Path) -> list[str]:
    """Why the folder is not a complete checkpoint (empty when it is). Complete means every file it needs
    is there and parses: train_params.yaml (a YAML mapping), .metadata (safe to unpickle), and every shard
    .metadata names, at least as long as it says."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return [f"{ckpt_dir} is not a folder"]
    reasons = []
    try:
        load_train_params(ckpt_dir)
    except CheckpointError as err:
        reasons.append(str(err))
    if not (ckpt_dir / METADATA).is_file():
        return [f"{ckpt_dir}/{METADATA} is missing (the save did not finish: it is written last)"] + reasons
    try:
        needed = shard_sizes(ckpt_dir)
    except UnsafeCheckpointError as err:  # damaged, or carrying code (CodeInCheckpointError): never loaded
        return [str(err)] + reasons
    for name, size in sorted(needed.items()):
        shard = ckpt_dir / name
        if not shard.is_file():
            reasons.append(f"{shard} is missing (named in {METADATA})")
        elif shard.stat().st_size < size:
            reasons.append(f"{shard} has {shard.stat().st_size} bytes, {METADATA} says {size}")
    return reasons


def is_complete(ckpt_dir: str | Path) -> bool:
    return not incomplete_reasons(ckpt_dir)


def require_complete(ckpt_dir: str | Path) -> None:
    """CheckpointError (one line, naming each damaged file) unless the folder is complete."""
    reasons = incomplete_reasons(ckpt_dir)
    if reasons:
        raise CheckpointError(f"{ckpt_dir} is not a complete checkpoint: " + "; ".join(reasons)
                              + ". Use an earlier step_<k> folder, or finish/re-run the save.")


def read_latest_pointer(output_dir: str | Path) -> tuple[Path | None, str | None]:
    """(the step folder <output_dir>/latest names, None) or (None, what is wrong with the pointer).
    No pointer at all is (None, None). The pointer must be UTF-8 text naming a step_<k> folder beside it."""
    pointer = Path(output_dir) / LATEST
    if not pointer.is_file():
        return None, None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"{pointer} is not text (damaged); it should hold a name like step_20"
    if step_number(name) is None or "/" in name:
        return None, f"{pointer} holds {name[:40]!r}, not a step_<k> name"
    if not (Path(output_dir) / name).is_dir():
        return None, f"{pointer} names {name}, which does not exist"
    return Path(output_dir) / name, None


def choose_latest(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """What resume=auto resumes from: the step folder `latest` names if complete, else the highest complete
    step_<k>; and one line per file that made it pass something over (the pointer, a damaged folder)."""
    output_dir = Path(output_dir)
    notes = []
    target, problem = read_latest_pointer(output_dir)
    if problem:
        notes.append(problem)
    if target is not None:
        reasons = incomplete_reasons(target)
        if not reasons:
            return target, notes
        notes.append(f"skips {target}: {reasons[0]}")
    for path in reversed(list_step_dirs(output_dir)):
        if path == target:
            continue
        reasons = incomplete_reasons(path)
        if not reasons:
            return path, notes
        notes.append(f"skips {path}: {reasons[0]}")
    return None, notes


def find_latest(output_dir: str | Path) -> Path | None:
    """The step folder named by <output_dir>/latest if complete; else the highest complete step_<k>."""
    return choose_latest(output_dir)[0]


def is_run_folder(path: str | Path) -> bool:
    """A run's output folder: it holds `latest` or step_<k> folders (and is not a checkpoint itself)."""
    path = Path(path)
    return not (path / METADATA).exists() and ((path / LATEST).exists() or bool(list_step_dirs(path)))


def resolve_checkpoint(path: str | Path) -> Path:
    """The step folder a command was given: a step folder as is; for a run folder, the one its `latest`
    names. A path given by hand is taken strictly: a damaged pointer is an error, not a guess."""
    path = Path(path)
    if not (path / LATEST).exists() or (path / METADATA).exists():
        return path
    target, problem = read_latest_pointer(path)
    if problem:
        raise CheckpointError(f"{problem}; give a step_<k> folder of {path} instead")
    return target


def select_checkpoint(given: str | Path, output_dir: str | Path | None = None) -> tuple[Path | None, list[str]]:
    """The one rule for which checkpoint a command loads (finetune's resume, preflight, convert, infer,
    doctor): (the step folder, notes). given "auto" (checkpoint.resume=auto): choose_latest(output_dir),
    None when it holds no complete checkpoint, notes naming each file that made it pass one over. Anything
    else is a path, taken strictly (resolve_checkpoint): a step folder as is, a run folder's `latest`."""
    if str(given) == "auto":
        return choose_latest(output_dir) if output_dir is not None and Path(output_dir).is_dir() else (None, [])
    return resolve_checkpoint(given), []


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
    final, tmp = step_dir(output_dir, step), tmp_step_dir(output_dir, step)
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
    faults.in_save(step, rank, output_dir, tmp)  # test-only: RECIPES_FAULT_KILL_IN_SAVE (shards written, no rename)

    if rank == 0:
        (tmp / TRAIN_PARAMS).write_text(yaml.safe_dump(train_params, sort_keys=False), encoding="utf-8")
        if not is_complete(tmp):
            raise RuntimeError(f"{tmp}: DCP wrote an incomplete checkpoint")
        publish_folder(tmp, final)  # rank 0 alone; dcp.save returned after every rank wrote its shards
        write_text_atomically(output_dir / LATEST, final.name + "\n")
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
    require_complete(ckpt_dir)
    saved_keys = {key.split(".")[0] for key in metadata.state_dict_metadata}
    full = {"optim", "trainer", "scheduler"} <= saved_keys

    state = {"model": model_state(model, lora)}
    if full:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
        state["scheduler"] = scheduler.state_dict()
        state["trainer"] = dict(trainer_state)  # DCP loads only the keys the target dict has
    dcp.load(state, checkpoint_id=str(ckpt_dir), planner=weights_only_load_planner())
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


# ----- loading the model back (one process, no process group: convert, infer, notebooks) ---------------

def saved_model_entries(ckpt_dir: str | Path) -> dict:
    """{name inside "model": tensor metadata} for the tensors saved under the "model" key."""
    return {key[len("model."):]: meta for key, meta in read_metadata(ckpt_dir).state_dict_metadata.items()
            if key.startswith("model.") and hasattr(meta, "size")}


def model_mismatches(saved: dict, model) -> tuple[list[str], list[str]]:
    """The one shape check of a checkpoint against a model (preflight before a resume, and the rebuild
    below). saved: saved_model_entries(ckpt_dir). Returns (the model's tensors the checkpoint lacks,
    "name: [saved] saved, [shape] in the model" for each saved with another shape). A tied lm_head is the
    embedding, so it need not be saved."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(saved))
    wrong = [f"{k}: {list(saved[k].size)} saved, {list(shape)} in the model" for k, shape in expected.items()
             if k in saved and tuple(saved[k].size) != shape]
    return missing, wrong


def _dcp_load_in_place(state_dict: dict[str, torch.Tensor], ckpt_dir: Path) -> None:
    """Read only these "model" entries into the given tensors, in one process."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        dcp.load({"model": state_dict}, checkpoint_id=str(ckpt_dir), no_dist=True)


def _meta_modules_by_size(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that still own unallocated (meta) tensors, largest first."""
    owners = [m for m in model.modules()
              if any(t.is_meta for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])]
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return sorted(owners, key=size, reverse=True)


def _load_full_model(ckpt_dir: Path, params: dict):
    """Build the model on the meta device and read the checkpoint into it, allocating as it reads.

    DCP reads each tensor into a temporary of the same size before copying it into place. The largest
    tensors (embedding, lm_head) are allocated and read first, one by one, while the rest of the model
    is still on meta; then the rest is allocated and read in one pass. The peak is then about one copy
    of the model plus one decoder-layer tensor, not plus the largest tensor."""
    from recipes_core.models import build_model_from_config, reset_rotary_buffers

    saved = saved_model_entries(ckpt_dir)
    dtype = next(iter(saved.values())).properties.dtype
    model = build_model_from_config(params["model_config"], device="meta", dtype=dtype).eval()
    missing, wrong = model_mismatches(saved, model)
    if missing:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint's 'model' lacks {len(missing)} weights the "
                              f"model_config needs, e.g. {missing[:3]}; train_params.yaml and the shards "
                              "do not belong together")
    if wrong:
        raise CheckpointError(f"{ckpt_dir}: {len(wrong)} saved tensors do not have the shapes model_config gives "
                              f"(e.g. {wrong[0]}); train_params.yaml and the shards do not belong together")
    # Tied: lm_head is the embedding (FSDP's state dict may list both names for the one tensor); read the
    # embedding only, as from_pretrained would, so the folder stores one copy and stays tied.
    tied = bool(model.config.tie_word_embeddings)
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
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
    from recipes_core.models import resolve_model_source

    hf_dir = model_source.get("hf_dir")
    if not hf_dir or not Path(hf_dir).exists():
        hf_dir = resolve_model_source(model_source["kind"], model_source.get("path", ""),
                                      model_source.get("tiny_variant", "instruct"))["hf_dir"]
    return Path(hf_dir)


def _load_lora_model(ckpt_dir: Path, params: dict):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

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
    """(model, train_params, step folder) from a complete checkpoint (a step folder, or a run folder's
    `latest`), in one process. LoRA runs give a peft model around the base weights of model_source."""
    ckpt_dir, _ = select_checkpoint(checkpoint)
    require_complete(ckpt_dir)
    params = load_train_params(ckpt_dir)
    for key in ("model_config", "tokenizer"):
        if not params.get(key):
            raise CheckpointError(f"{ckpt_dir}/{TRAIN_PARAMS}: field '{key}' is missing or empty")
    model = _load_lora_model(ckpt_dir, params) if params.get("lora") else _load_full_model(ckpt_dir, params)
    return model, params, ckpt_dir


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
    try:
        return int(float(text.rstrip("kKmMbB")) * scale), text
    except ValueError:
        raise UsageError(f"--params {text}: not a parameter count; write e.g. 7B, 135M or 1.5e9") from None


@command  # bad input -> one `error:` line, exit 2
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
        ckpt, _ = select_checkpoint(args.dir)
        require_complete(ckpt)
        print(format_size_report(size_report(ckpt)))
    if args.params is not None or not args.dir:
        for text in args.params or ["7B", "8B", "70B"]:
            print(format_paper_report(*_parse_count(text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
