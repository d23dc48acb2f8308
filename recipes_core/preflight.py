"""Checks that run once at the start of training, before any step: a run that cannot finish should stop
in its first seconds with one line saying what is wrong and how to fix it, not hours later (a full disk at
the first checkpoint) or with a traceback from deep inside torch (a mesh that does not divide the ranks).

Two calls from recipes_core.finetune.train:
  check_start(cfg, env)   before anything is written or loaded: impossible config values, the HSDP mesh
                          against the world size, data files and model folder present, a compiler for
                          train.compile, the output folder
                          writable (unfinished saves of a crashed run are removed), and the
                          checkpoint to resume from: safe to unpickle (restricted unpickler), complete, its
                          per-rank RNG file loadable with weights_only=True
  check_run(cfg, env, tokenizer, tokenizer_dir, model_config)
                          once the tokenizer and the model config are known: a pad token, a chat template
                          for chat data, the resume checkpoint's shapes against the model config, and free
                          disk for the predicted checkpoint size (checkpoint.predict_sizes)
  check_data(cfg, env, tokenizer, embedding_rows)
                          every row loaded and tokenized before the model is built: bad rows (file, row and
                          field named), no supervised token left, a token id past the model's embedding

Every rank runs the checks; a failure anywhere is agreed on with one all_gather_object (agree), so all ranks stop
together (none is left waiting in a collective). A failure raises PreflightError, which the command line
prints as `error: preflight: ...` and exits with status 2.
"""

from __future__ import annotations

from recipes_core.errors import UserError, one_line

import sys
from pathlib import Path

from recipes_core import faults

MIB = 1024 * 1024


class PreflightError(UserError, ValueError):
    """The run cannot start or could not finish; the message names what and how to fix it."""


def agree(errors: list[str], env) -> None:
    """Raise on every rank when any rank found a problem; the message is the first problem of the lowest
    rank that found one, so rank 0 (the one that prints) reports it even when it found nothing itself."""
    import torch.distributed as dist

    first = errors[0] if errors else None
    if env is not None and env.world_size > 1 and dist.is_initialized():
        firsts = [None] * env.world_size
        dist.all_gather_object(firsts, first)
        first = next((e for e in firsts if e), None)
    if first:
        raise PreflightError("preflight: " + one_line(first))


# ----- before anything is loaded -----------------------------------------------------------------------

def mesh_errors(sharding: str, replicate_degree: int, world_size: int, local_world_size: int) -> list[str]:
    """HSDP needs a (replicate x shard) mesh that covers every rank exactly once."""
    if sharding != "hybrid":
        return []
    replicas = replicate_degree or max(1, world_size // local_world_size)
    if not replicate_degree and world_size % local_world_size:
        return [f"fsdp.replicate_degree=0 means one replica per node, but the world size {world_size} is not a "
                f"multiple of the {local_world_size} processes per node; start the same number on every node or "
                "set fsdp.replicate_degree"]
    where = "fsdp.replicate_degree" + ("" if replicate_degree else "=0 (one replica per node)")
    if replicas > world_size or world_size % replicas:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        return [f"{where} gives {replicas} replica groups, which does not divide the world size {world_size} "
                f"(fsdp.sharding=hybrid needs replicate x shard = world size); set fsdp.replicate_degree to one "
                f"of {divisors} or launch a multiple of {replicas} processes"]
    return []


def input_errors(cfg) -> list[str]:
    from recipes_core.data import LOCAL_SUFFIXES

    from recipes_core.models import model_folder_errors
    from recipes_core.tokens import tokenizer_folder_error

    errors = []
    for key in ("train_path", "eval_path"):
        path = getattr(cfg.data, key)
        if path and Path(path).is_dir():
            errors.append(f"data.{key}={path}: a folder, not a data file; give one .jsonl, .json or .parquet file")
        elif path and Path(path).suffix in LOCAL_SUFFIXES and not Path(path).is_file():
            errors.append(f"data.{key}={path}: no such file; check the path (relative paths start from the "
                          "folder the run is launched in)")
    if cfg.model.source == "hf" and not (Path(cfg.model.path) / "config.json").is_file():
        errors.append(f"model.path={cfg.model.path}: not a Hugging Face model folder (no config.json); point it "
                      "at a folder written by save_pretrained, or use model.source=hub for a hub name")
    elif cfg.model.source == "hf":  # a damaged config.json or safetensors header, found before any load
        errors += [f"model.path: {e}" for e in model_folder_errors(cfg.model.path)]  # each names its file
        if not cfg.model.tokenizer and tokenizer_folder_error(cfg.model.path):
            errors.append(f"model.path: {tokenizer_folder_error(cfg.model.path)}")
    if cfg.model.tokenizer and tokenizer_folder_error(cfg.model.tokenizer):
        errors.append(f"model.tokenizer: {tokenizer_folder_error(cfg.model.tokenizer)}")
    if cfg.model.source == "gguf" and not Path(cfg.model.path).is_file():
        errors.append(f"model.path={cfg.model.path}: no such GGUF file")
    if cfg.model.tokenizer and not Path(cfg.model.tokenizer).exists() and "/" in cfg.model.tokenizer \
            and cfg.model.tokenizer.startswith((".", "/")):
        errors.append(f"model.tokenizer={cfg.model.tokenizer}: no such folder")
    return errors


def existing_ancestor(path: Path) -> Path:
    """The folder itself, or its nearest ancestor that exists (where a new output folder would be made)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_dir_errors(out: Path, rank: int) -> list[str]:
    """Can this rank write there? Probed with a file in the folder, or in its nearest existing ancestor
    when it does not exist yet: preflight creates nothing, so a run that fails it leaves nothing behind."""
    where = existing_ancestor(out)
    probe = where / f".preflight_write_test_rank{rank}"
    try:
        if not where.is_dir():
            raise NotADirectoryError(f"{where} is a file")
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        return [f"checkpoint.output_dir={out}: cannot write there ({err.strerror or err}); choose a folder this "
                "user can write, or fix its permissions"]
    return []


def resume_errors(cfg, out: Path, rank: int) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the checkpoint checkpoint.resume would load (checkpoint.select_checkpoint,
    the same rule the trainer then follows)."""
    from recipes_core import checkpoint as ckpt
    from recipes_core.safety import CodeInCheckpointError, UnsafeCheckpointError, load_torch_file

    errors, warnings = [], []
    resume = cfg.checkpoint.resume
    if not resume:
        return errors, warnings
    if resume != "auto" and not Path(resume).is_dir():
        return [f"checkpoint.resume={resume}: no such folder; give a step_<k> folder or use auto"], warnings
    try:
        chosen, notes = ckpt.select_checkpoint(resume, out)
    except ckpt.CheckpointError as err:  # a run folder whose `latest` is damaged: a path is taken strictly
        return [f"checkpoint.resume={resume}: {err}"], warnings
    # select_checkpoint says what resume=auto passed over (a damaged `latest`, train_params.yaml, shard)
    warnings += [f"resume=auto: {one_line(note)}" for note in notes]
    if resume == "auto":
        newer = [p for p in (ckpt.list_step_dirs(out) if out.is_dir() else [])
                 if chosen is None or ckpt.step_number(p) > ckpt.step_number(chosen)]
        for folder in newer:  # passed over: refuse outright if its .metadata carries code
            try:
                ckpt.read_metadata(folder)
            except CodeInCheckpointError as err:
                errors.append(f"checkpoint.resume=auto: {err} Remove {folder} before resuming")
                return errors, warnings
            except (UnsafeCheckpointError, FileNotFoundError):
                pass  # damaged or unfinished: the notes say so
    else:
        reasons = ckpt.incomplete_reasons(chosen)  # a path given by hand: damaged is an error, no fallback
        if reasons:
            return [f"checkpoint.resume={resume}: not a complete checkpoint: {reasons[0]}"], warnings
    if chosen is not None:
        rng = chosen / f"rng_rank{rank}.pt"
        if rng.is_file():
            try:
                load_torch_file(rng)
            except UnsafeCheckpointError as err:
                errors.append(f"checkpoint.resume: {err}")
            except Exception as err:  # truncated or not a torch file
                errors.append(f"checkpoint.resume: {rng} cannot be read ({type(err).__name__}: {err}); the "
                              "checkpoint is damaged, resume from an earlier step_<k> folder")
    return errors, warnings


def check_start(cfg, env) -> None:
    """Checks before the run writes or loads anything (every rank calls this)."""
    from recipes_core.config import config_errors

    errors = config_errors(cfg) + mesh_errors(cfg.fsdp.sharding, cfg.fsdp.replicate_degree, env.world_size,
                                              env.local_world_size)
    errors += input_errors(cfg) + compile_errors(cfg.train.compile, env.device.type)
    out = Path(cfg.checkpoint.output_dir)
    if not errors:
        errors += output_dir_errors(out, env.rank)
    if not errors:
        found, warnings = resume_errors(cfg, out, env.rank)
        errors += found
        if env.is_main:
            for line in warnings:
                print(f"WARNING: {line}", file=sys.stderr)
    agree(errors, env)
    if env.is_main:
        from recipes_core.checkpoint import remove_unfinished_saves

        for folder in remove_unfinished_saves(out):
            print(f"preflight: removed {folder}, an unfinished save of an earlier run", file=sys.stderr)


def compile_errors(compile: bool, device_type: str) -> list[str]:
    """train.compile needs inductor's compiler: a C++ compiler on CPU, Triton on CUDA. Without it the first
    step would fail deep inside torch._inductor; here it is one line."""
    import importlib.util
    import os
    import shutil

    if not compile:
        return []
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return ["train.compile=true on CUDA needs Triton (pip install triton, the version your torch wheel "
                    "names) or set train.compile=false"]
        return []
    wanted = os.environ.get("CXX")  # inductor uses $CXX when set, else the first of these it finds
    found = shutil.which(wanted) if wanted else next(filter(None, map(shutil.which, ("g++", "c++", "clang++"))), None)
    if found is None:
        where = f"$CXX={wanted} is not an executable" if wanted else "no g++, c++ or clang++ on PATH"
        return [f"train.compile=true on CPU needs a C++ compiler ({where}); install one (apt install g++) or set "
                "train.compile=false"]
    return []


# ----- once the tokenizer and model config are known --------------------------------------------------

def tokenizer_errors(tokenizer, tokenizer_dir, data_format: str) -> list[str]:
    errors = []
    if tokenizer.pad_token_id is None:
        errors.append(f"tokenizer {tokenizer_dir} has no pad token; set one that is not the end-of-turn token "
                      "(e.g. tokenizer.pad_token = '<|finetune_right_pad_id|>' or another reserved token, then "
                      "save_pretrained) and point model.tokenizer at that folder")
    if data_format == "chat" and not getattr(tokenizer, "chat_template", None):
        errors.append(f"data.format=chat but tokenizer {tokenizer_dir} has no chat template; use the instruct "
                      "model's tokenizer (model.tokenizer=...) or add a template (tokenizer.chat_template = ..., "
                      "save_pretrained)")
    return errors


def predicted_checkpoint_bytes(cfg, model_config: dict) -> tuple[int, int, int]:
    """(bytes of one checkpoint, parameters saved, trainable parameters), from a meta-device build."""
    from recipes_core.checkpoint import predict_sizes
    from recipes_core.models import build_model_from_config

    model = build_model_from_config(model_config, device="meta")
    if cfg.lora.enabled:
        from recipes_core.lora import add_lora

        model = add_lora(model, cfg.lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        saved = trainable
    else:
        trainable = sum(p.numel() for p in model.parameters())
        saved = sum(t.numel() for t in model.state_dict().values())  # tied weights are saved twice
    del model
    sizes = predict_sizes(saved, trainable, 4, save_optimizer=cfg.checkpoint.save_optimizer)
    return sizes["total"], saved, trainable


def disk_errors(cfg, model_config: dict) -> tuple[list[str], list[str]]:
    out = Path(cfg.checkpoint.output_dir)
    needed, saved, trainable = predicted_checkpoint_bytes(cfg, model_config)
    needed = int(needed * 1.02) + MIB  # DCP framing per tensor, train_params.yaml, RNG files
    free = faults.disk_free_bytes(existing_ancestor(out))  # the folder is made once preflight passed
    per_param = 12 if cfg.checkpoint.save_optimizer and not cfg.lora.enabled else None
    how = f"{saved:,} parameters" + (f" x {per_param} B with the optimizer" if per_param else "")
    if free < needed:
        fix = "free some space or choose another checkpoint.output_dir"
        if cfg.checkpoint.save_optimizer:
            fix += ", or set checkpoint.save_optimizer=false (model only, a cold optimizer on resume)"
        return [f"not enough free disk for one checkpoint: checkpoint.output_dir={out} has {free / MIB:.1f} MiB "
                f"free, a checkpoint needs about {needed / MIB:.1f} MiB ({how}); {fix}"], []
    warnings = []
    saves = 0
    if cfg.train.max_steps:
        saves = (cfg.train.max_steps // cfg.checkpoint.save_every if cfg.checkpoint.save_every else 0) + 1
        if cfg.checkpoint.keep_last_n:
            saves = min(saves, cfg.checkpoint.keep_last_n + 1)  # the newest is written before pruning
    if saves > 1 and free < needed * saves:
        warnings.append(f"{saves} checkpoints of ~{needed / MIB:.1f} MiB will be kept but {out} has "
                        f"{free / MIB:.1f} MiB free; set checkpoint.keep_last_n or free space")
    return [], warnings


def shape_errors(cfg, model_config: dict) -> list[str]:
    """The resume checkpoint's model tensors against the shapes this model config builds (the check
    checkpoint.model_mismatches makes, here before any rank loads a byte)."""
    from recipes_core import checkpoint as ckpt
    from recipes_core.models import build_model_from_config

    if not cfg.checkpoint.resume or cfg.lora.enabled:
        return []
    chosen, _ = ckpt.select_checkpoint(cfg.checkpoint.resume, cfg.checkpoint.output_dir)
    if chosen is None:
        return []
    missing, wrong = ckpt.model_mismatches(ckpt.saved_model_entries(chosen),
                                           build_model_from_config(model_config, "meta"))
    if wrong:
        return [f"checkpoint.resume: {chosen} does not fit the model config ({len(wrong)} tensors differ, e.g. "
                f"{wrong[0]}); resume with the model it was trained from"]
    if missing:
        return [f"checkpoint.resume: {chosen} lacks {len(missing)} of the model's tensors (e.g. {missing[0]}); "
                "it was trained from another model"]
    return []


def check_run(cfg, env, tokenizer, tokenizer_dir, model_config: dict) -> None:
    """Checks once the tokenizer and the model config are loaded (every rank calls this)."""
    errors = tokenizer_errors(tokenizer, tokenizer_dir, cfg.data.format)
    warnings = []
    if not errors:
        errors += shape_errors(cfg, model_config)
        if not errors:
            errors, warnings = disk_errors(cfg, model_config)
    if env.is_main:
        for line in warnings:
            print(f"WARNING: {line}", file=sys.stderr)
    agree(errors, env)


# ----- the data, tokenized as the run will see it -----------------------------------------------------

def check_data(cfg, env, tokenizer, embedding_rows: int) -> dict[str, list[dict]]:
    """Load and tokenize the train and eval files on every rank (the same result everywhere) and agree on
    what makes them untrainable: a bad row (file, row and field named), no supervised token left after
    truncation, a token id past the model's embedding. Returns {"train": examples, "eval": examples}."""
    from recipes_core.checks import untrainable_errors
    from recipes_core.preprocess import tokenize_file

    errors, examples = [], {"train": [], "eval": []}
    for split, limit in (("train", cfg.data.max_train_examples), ("eval", cfg.data.max_eval_examples)):
        path = getattr(cfg.data, f"{split}_path")
        if not path or errors:
            continue
        try:
            examples[split] = tokenize_file(path, cfg.data, tokenizer, limit)
        except UserError as err:
            errors.append(str(err))
            continue
        errors += untrainable_errors(examples[split], f"data.{split}_path={path}",
                                     f"data.max_seq_len={cfg.data.max_seq_len}", embedding_rows, tokenizer)
    agree(errors, env)
    return examples
