"""Full-parameter (or LoRA) fine-tuning with FSDP2: the training loop a reader can hold in their head.

    torchrun --nproc_per_node 2 -m recipes_core.finetune --config cookbook/tiny_full.yaml train.max_steps=20
    python -m recipes_core.finetune --config cookbook/tiny_full.yaml      # one plain process, same code

One optimizer step, in order:
  1. take grad_accum_steps micro-batches on every rank (a DistributedSampler gives each rank its slice);
  2. count the supervised tokens (labels != -100) of the whole step on all ranks: one all_reduce;
  3. for each micro-batch: loss = sum of token losses / that global count, backward;
     so every supervised token weighs the same, however the tokens fall into micro-batches and ranks
     (a mean of per-batch means would weigh a token of a short answer more than one of a long answer);
  4. clip the gradient norm, AdamW step, learning-rate schedule step (warmup, then cosine or linear decay);
  5. log; every eval_every steps evaluate (loss, perplexity); every save_every steps checkpoint.

train() reads top to bottom: preflight checks, then the setup functions (setup_inputs, setup_data,
build_sharded_model, setup_optimizer, restore), then the loop, which calls train_step (steps 2-4; the
benchmarks call the same function) and keeps its place in a TrainState (saved in every checkpoint).
"""

from __future__ import annotations

import argparse
import faulthandler
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, DistributedSampler

from recipes_core import IGNORE_INDEX
from recipes_core import checkpoint as ckpt
from recipes_core import distributed as D
from recipes_core import faults, preflight
from recipes_core.collate import pack_examples, packed_collate, pad_collate
from recipes_core.config import Config, dump, load_config, to_dict
from recipes_core.errors import command
from recipes_core.launch import allocator_in_use
from recipes_core.lora import add_lora, initial_adapter_weights, lora_fields, weight_sources
from recipes_core.loss import chunked_token_loss_sum
from recipes_core.metrics import MetricsLogger, current_memory_bytes, flops_per_token, peak_flops, peak_memory_bytes
from recipes_core.models import (build_model_from_config, load_full_model, load_model_config, reset_rotary_buffers,
                                 resolve_model_source, safetensors_weights)
from recipes_core.preprocess import today_for_templates, tokenize_file
from recipes_core.profiling import StepProfiler
from recipes_core.tokens import load_tokenizer


# ----- data --------------------------------------------------------------------------------------------

def tokenized(path: str, cfg: Config, tokenizer, limit: int) -> list[dict]:
    """One file, loaded, tokenized and (data.packing) packed as the run does, outside a run."""
    return training_examples(tokenize_file(path, cfg.data, tokenizer, limit), cfg, tokenizer)


def training_examples(examples: list[dict], cfg: Config, tokenizer) -> list[dict]:
    """Tokenized examples (preflight.check_data loads and checks them) as the loader takes them: ids and
    labels only, packed into blocks of max_seq_len when data.packing."""
    examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    if cfg.data.packing:
        return pack_examples(examples, cfg.data.max_seq_len, tokenizer.pad_token_id)
    return examples


def collate_fn(cfg: Config, pad_token_id: int):
    return packed_collate if cfg.data.packing else partial(pad_collate, pad_token_id=pad_token_id)


def eval_batches(examples: list[dict], cfg: Config, env: D.DistEnv, collate) -> list[dict]:
    """This rank's eval batches. Every rank must run the same number of forward passes (each one
    all-gathers parameters), so the shorter shards are topped up with copies whose labels are all -100:
    they cost a forward pass and count for nothing (DistributedSampler would count duplicates)."""
    mine = examples[env.rank::env.world_size]
    per_rank = math.ceil(len(examples) / env.world_size)
    filler = {"input_ids": examples[0]["input_ids"], "labels": [IGNORE_INDEX] * len(examples[0]["labels"])}
    if cfg.data.packing:
        filler["position_ids"] = examples[0]["position_ids"]
    mine = mine + [filler] * (per_rank - len(mine))
    size = cfg.train.micro_batch_size
    batches = [collate(mine[i:i + size]) for i in range(0, len(mine), size)]
    return batches[:cfg.train.max_eval_batches] if cfg.train.max_eval_batches else batches


def setup_data(cfg: Config, env: D.DistEnv, tokenizer, examples: dict[str, list[dict]]):
    """(train loader, its sampler, this rank's eval batches, total optimizer steps) from the examples
    preflight.check_data tokenized and checked."""
    collate = collate_fn(cfg, tokenizer.pad_token_id)
    train_set = training_examples(examples["train"], cfg, tokenizer)
    eval_set = training_examples(examples["eval"], cfg, tokenizer)
    sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=cfg.data.shuffle,
                                 seed=cfg.train.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=cfg.train.micro_batch_size, sampler=sampler, collate_fn=collate,
                        drop_last=True)
    evals = eval_batches(eval_set, cfg, env, collate) if eval_set else []
    accum = cfg.train.grad_accum_steps
    steps_per_epoch = len(loader) // accum
    preflight.agree([f"data.train_path={cfg.data.train_path}: {len(train_set)} training examples are fewer than one "
                     f"global batch ({cfg.train.micro_batch_size} x {accum} x {env.world_size} ranks); add rows or "
                     "lower train.micro_batch_size / train.grad_accum_steps"] if steps_per_epoch == 0 else [], env)
    return loader, sampler, evals, cfg.train.max_steps or steps_per_epoch * cfg.train.epochs


# ----- loss --------------------------------------------------------------------------------------------

def supervised_tokens(batch: dict) -> int:
    """Positions the loss counts: labels are shifted by one (token t predicts label t+1)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(model, batch: dict, device: torch.device, chunk_size: int = 0) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy over the supervised tokens of the batch.

    Token t predicts label t+1: the labels are shifted left and their end padded with IGNORE_INDEX,
    so the loss runs on the whole (B x T x vocab) logits tensor as it is, a view and no copy (slicing
    the logits instead, logits[:, :-1], copies all of them: 25 MiB per 128 tokens for a 49k vocab,
    and again for its gradient). fp32 logits need no cast; bf16 ones are upcast for an exact loss.
    chunk_size > 0 and fewer tokens than the micro-batch has: recipes_core.loss computes it in chunks."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if 0 < chunk_size < batch["labels"].numel():
        return chunked_token_loss_sum(model, inputs, batch["labels"].to(device), chunk_size)
    logits = model(**inputs, use_cache=False).logits
    if logits.dtype != torch.float32:
        logits = logits.float()
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).to(device)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def evaluate(model, batches: list[dict], env: D.DistEnv) -> dict:
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    for batch in batches:
        loss_sum += token_loss_sum(model, batch, env.device).double().cpu()
        count += supervised_tokens(batch)
    model.train()
    totals = D.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64)]), env.device)
    loss = float(totals[0] / totals[1])
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(totals[1])}


# ----- one optimizer step ------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float              # mean loss per supervised token of the global batch (all ranks)
    grad_norm: float         # total gradient norm, before clipping
    lr: float                # the learning rate this step used
    tokens: int              # tokens of the global batch, padding included
    supervised_tokens: int   # tokens of the global batch the loss counts


def train_step(model, micro_batches: list[dict], optimizer, scheduler, env: D.DistEnv,
               max_grad_norm: float = 0.0, loss_chunk_size: int = 0, gather_once_per_step: bool = False,
               activation_offload: bool = False, reduce_every_micro_batch: bool = False) -> StepResult:
    """Steps 2-4 of the module docstring over this rank's micro-batches; every rank calls it together.

    `model` is the FSDP2 model of build_sharded_model, or a plain module in a group of one (the
    benchmarks profile both). `scheduler` may be None (constant lr); max_grad_norm 0 means no clipping;
    loss_chunk_size > 0: the loss of a micro-batch with more tokens is computed in chunks (train.loss_chunk_size).
    gather_once_per_step (fsdp.gather_once_per_step, with a model sharded the same way): the parameters
    gathered by the first micro-batch stay gathered until the last one's backward, which frees them.
    activation_offload (fsdp.activation_offload, CUDA): the forward's saved tensors wait in host memory.
    reduce_every_micro_batch (fsdp.reduce_every_micro_batch): reduce-scatter after every micro-batch, so no
    rank ever holds the whole model's unsharded gradients (see the config field).

    Collectives per step (2 ranks, counted by profiling.count_collectives): the all-gathers and
    reduce-scatters of FSDP, plus three small all-reduces: the supervised-token count, the clipping's
    gradient norm (one for all DTensor gradients), and the loss and token totals for the log."""
    global_supervised = D.all_reduce_sum(sum(supervised_tokens(b) for b in micro_batches), env.device)
    if global_supervised.item() == 0:
        raise ValueError("no supervised token in the global batch of this step; check the masks")
    # Summed on the device: a .cpu() per micro-batch would make the host wait for the GPU each time.
    local_loss = torch.zeros((), dtype=torch.float64, device=env.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if isinstance(model, FSDPModule):
            # reduce-scatter after the last micro-batch only (FSDP2 keeps every unsharded gradient until then),
            # or after each one (fsdp.reduce_every_micro_batch: the sharded gradients accumulate instead)
            model.set_requires_gradient_sync(last or reduce_every_micro_batch)
            if gather_once_per_step:  # no all-gather for the next micro-batch: free them after the last backward
                model.set_reshard_after_backward(last)
        with D.offloaded_activations(activation_offload):
            loss_sum = token_loss_sum(model, batch, env.device, loss_chunk_size)
        # FSDP averages gradients over ranks; x world_size turns that average into the sum we want.
        (loss_sum * env.world_size / global_supervised.to(loss_sum.dtype)).backward()
        local_loss += loss_sum.detach().double()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = torch.tensor(float(sum(b["input_ids"].numel() for b in micro_batches)), dtype=torch.float64,
                          device=env.device)
    totals = D.all_reduce_sum(torch.stack([local_loss, tokens]), env.device)
    return StepResult(loss=float(totals[0] / global_supervised.double()), grad_norm=float(grad_norm), lr=lr,
                      tokens=int(totals[1]), supervised_tokens=int(global_supervised))


# ----- setup: inputs, model, optimizer, restore --------------------------------------------------------

def resume_folder(cfg: Config, env: D.DistEnv) -> Path | None:
    """The checkpoint this run resumes from (preflight.check_start refused a damaged one given by hand and
    warned about what resume=auto passes over), or None."""
    if not cfg.checkpoint.resume:
        return None
    out = Path(cfg.checkpoint.output_dir)
    chosen, _ = ckpt.select_checkpoint(cfg.checkpoint.resume, out)  # preflight's choice, same rule
    if chosen is None and env.is_main:
        print(f"resume=auto: no checkpoint under {out} yet; starting fresh")
    return chosen


def setup_inputs(cfg: Config, env: D.DistEnv, resume_dir: Path | None):
    """(config with the run's chat date, model source, tokenizer, model config), checked by preflight.check_run.
    Rank 0 materializes the model source once (builds tiny / converts GGUF), then every rank reads it."""
    chat_date = D.broadcast_object(run_chat_date(cfg, resume_dir) if env.is_main else None)
    cfg = replace(cfg, data=replace(cfg.data, chat_date=chat_date))  # a copy: the caller's config is left as is
    source = resolve_model_source(cfg.model.source, cfg.model.path, cfg.model.tiny_variant) if env.is_main else None
    source = D.broadcast_object(source)
    tokenizer_dir = cfg.model.tokenizer or source["hf_dir"]
    tokenizer = load_tokenizer(tokenizer_dir, cfg.model.trust_remote_code)
    model_config = load_model_config(source["hf_dir"], cfg.model.trust_remote_code)
    preflight.check_run(cfg, env, tokenizer, tokenizer_dir, model_config)  # pad, chat template, shapes, free disk
    return cfg, source, tokenizer, model_config


def build_sharded_model(cfg: Config, env: D.DistEnv, hf_dir: str, model_config: dict, from_rank0: bool = False):
    """Meta-device model on every rank, sharded, then each rank reads its own rows of the weights from the
    safetensors files (D.load_sharded_weights: no full copy anywhere, no broadcast). from_rank0=True loads
    the way kept for folders without safetensors (rank 0 reads it all and broadcasts), which the tests and
    benchmarks/load_memory.py compare against."""
    torch.manual_seed(cfg.train.seed)  # same LoRA init on every rank
    model = build_model_from_config(model_config, device="meta")
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    mesh = D.build_mesh(env, cfg.fsdp.sharding, cfg.fsdp.replicate_degree)
    mp_policy, precision = D.mixed_precision_policy(cfg.fsdp.mixed_precision, env.device)
    cpu_offload = cfg.fsdp.cpu_offload and env.device.type == "cuda"
    if cfg.fsdp.cpu_offload and not cpu_offload:
        print("fsdp.cpu_offload ignored: parameters are already in CPU memory", file=sys.stderr)
    if cfg.fsdp.activation_offload and env.device.type != "cuda" and env.is_main:
        print("fsdp.activation_offload ignored: activations are already in CPU memory", file=sys.stderr)
    D.shard_model(model, mesh, mp_policy, cpu_offload, cfg.fsdp.activation_checkpointing,
                  cfg.fsdp.reshard_after_forward, cfg.fsdp.gather_once_per_step)
    weights, names = safetensors_weights(hf_dir), list(D.state_tensors(model))
    if cfg.lora.enabled:  # peft's names; the adapters are in no file
        adapters = initial_adapter_weights(model_config, cfg.lora, cfg.train.seed)
        weights = weight_sources(names, weights, adapters)
    missing = [name for name in names if name not in weights]
    if not missing and not from_rank0:
        if env.is_main:
            print(f"loading weights: each rank reads its own rows of {hf_dir}'s safetensors files")
        D.load_sharded_weights(model, weights, env.device, cpu_offload, reset_buffers=reset_rotary_buffers)
    else:  # no safetensors (only *.bin), or names transformers maps on load: from_pretrained on rank 0
        if env.is_main:
            why = f"{hf_dir} has no safetensors tensor named {missing[0]}" if missing else "from_rank0=True"
            print(f"loading weights: rank 0 reads the whole model and broadcasts it ({why})")
        D.load_full_weights_from_rank0(model, full_state_on_rank0(cfg, env, hf_dir), env.device, cpu_offload,
                                       reset_buffers=reset_rotary_buffers)
    if cfg.train.compile:
        D.compile_layers(model)
    model.train()
    return model, precision, dict(zip(mesh.mesh_dim_names, mesh.shape))


def full_state_on_rank0(cfg: Config, env: D.DistEnv, hf_dir: str) -> dict | None:
    """The whole model's state dict on rank 0 (from_pretrained, LoRA adapters added as on every rank), None
    on the others: the fallback of build_sharded_model, which rank 0 broadcasts."""
    if not env.is_main:
        return None
    reference = load_full_model(hf_dir, cfg.model.trust_remote_code)
    if cfg.lora.enabled:
        torch.manual_seed(cfg.train.seed)
        reference = add_lora(reference, cfg.lora)
    return reference.state_dict()


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def run_chat_date(cfg: Config, resume_dir: Path | None) -> str:
    """The date chat templates render in this run, fixed once (see DataConfig.chat_date): the config's,
    else the one the resumed checkpoint's run used, else today. Rank 0 decides (ranks could straddle
    midnight) and the choice is saved in config.yaml and train_params.yaml with the rest of the config."""
    saved = ""
    if resume_dir is not None:
        saved = ((ckpt.load_train_params(resume_dir).get("config") or {}).get("data") or {}).get("chat_date") or ""
    if cfg.data.chat_date:
        if saved and saved != cfg.data.chat_date:
            print(f"WARNING: data.chat_date={cfg.data.chat_date} differs from {saved}, the date {resume_dir} was "
                  "trained with: chat examples will tokenize differently from before the resume", file=sys.stderr)
        return cfg.data.chat_date
    return saved or today_for_templates()


def setup_optimizer(cfg: Config, params: list[torch.nn.Parameter], total_steps: int):
    """(AdamW, its lr schedule) over the trainable parameters."""
    # fused=True: one kernel for all parameters instead of a Python loop over them. On CPU the default
    # (for-each) AdamW took a third of a SmolLM2 step (benchmarks/RESULTS.md); fused is 10x faster there.
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_lambda, warmup=cfg.train.warmup_steps, total=total_steps, schedule=cfg.train.lr_schedule,
        min_ratio=cfg.train.min_lr_ratio))
    return optimizer, scheduler


@dataclass
class TrainState:
    """Where the run is. Saved as the "trainer" entry of every full checkpoint, restored on resume."""
    step: int = 0            # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already trained on (this rank's)
    tokens_seen: int = 0
    supervised_tokens_seen: int = 0


def restore(resume_dir: Path, model, optimizer, scheduler, cfg: Config, env: D.DistEnv) -> TrainState:
    """Load the checkpoint into model, optimizer, scheduler (and RNG); the state to carry on from."""
    restored = ckpt.load_checkpoint(resume_dir, model, optimizer, scheduler, asdict(TrainState()),
                                    lora=cfg.lora.enabled)
    if restored is None:
        message = (f"{resume_dir} is a model-only checkpoint (save_optimizer=false): the weights are "
                   "restored but the optimizer starts cold (no AdamW moments) at step 0 of a new schedule")
        warnings.warn(message)
        if env.is_main:
            print(f"WARNING: {message}", file=sys.stderr)
        return TrainState()
    state = TrainState(**{k: int(v) for k, v in restored.items()})
    saved_world = ckpt.load_train_params(resume_dir).get("world_size")
    if env.is_main:
        print(f"resumed from {resume_dir} at step {state.step}")
        if saved_world != env.world_size:  # DCP reshards the tensors; the data split differs
            print(f"WARNING: saved with {saved_world} ranks, resumed with {env.world_size}: weights and "
                  "optimizer are resharded exactly, but the remaining data order differs", file=sys.stderr)
    return state


def run_params(cfg: Config, env: D.DistEnv, source: dict, model_config: dict, model) -> dict:
    """train_params.yaml of every checkpoint: what convert and infer need to rebuild the model."""
    tokenizer_dir = cfg.model.tokenizer or source["hf_dir"]
    return {"config": to_dict(cfg), "model_source": source, "model_config": model_config,
            "tokenizer": str(Path(tokenizer_dir).resolve()) if Path(tokenizer_dir).exists() else tokenizer_dir,
            "step": 0, "save_optimizer": cfg.checkpoint.save_optimizer, "lora": lora_fields(cfg.lora),
            "world_size": env.world_size, "param_dtype": "fp32",
            "param_counts": {"total": sum(p.numel() for p in model.parameters()),
                             "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                             "saved": sum(t.numel() for t in ckpt.model_state(model, cfg.lora.enabled).values())}}


def save(cfg: Config, state: TrainState, model, optimizer, scheduler, train_params: dict) -> int:
    """Checkpoint step_<state.step>; returns the step saved."""
    train_params["step"] = state.step
    ckpt.save_checkpoint(cfg.checkpoint.output_dir, state.step, model, optimizer, scheduler, asdict(state),
                         train_params, cfg.checkpoint.save_optimizer, cfg.checkpoint.keep_last_n, cfg.lora.enabled)
    return state.step


# ----- what the run reports ----------------------------------------------------------------------------

def memory_per_rank(env: D.DistEnv, measure=peak_memory_bytes) -> list[int]:
    """Every rank's peak memory (metrics.peak_memory_bytes; or what `measure` returns, e.g.
    metrics.current_memory_bytes): one all_gather of one int64 per rank."""
    mine = torch.tensor([measure(env.device)], dtype=torch.int64, device=env.device)
    gathered = [torch.zeros_like(mine) for _ in range(env.world_size)]
    dist.all_gather(gathered, mine)
    return [int(t) for t in gathered]


class RunLog:
    """metrics.jsonl (and TensorBoard) on rank 0, the progress bar, the profiler (log.profile_steps > 0),
    and what a step's record adds to StepResult: throughput, MFU against peak_flops, each rank's peak memory."""

    def __init__(self, cfg: Config, env: D.DistEnv, model_config: dict, counts: dict, precision: str,
                 total_steps: int, state: TrainState, append: bool):
        self.cfg, self.env, self.model_config, self.counts = cfg, env, model_config, counts
        self.peak, self.peak_source = peak_flops(env.device, precision, cfg.log.peak_flops)
        self.logger = MetricsLogger(Path(cfg.checkpoint.output_dir) / "metrics.jsonl", env.is_main,
                                    cfg.log.tensorboard, append=append, wandb=cfg.log.wandb, mlflow=cfg.log.mlflow,
                                    experiment=cfg.log.experiment, run_config=to_dict(cfg))
        self.profiler = StepProfiler(cfg.log.profile_steps, cfg.checkpoint.output_dir, env.rank, env.device)
        self.progress = None
        if env.is_main and cfg.log.progress_bar:
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=state.step, desc="train", dynamic_ncols=True)

    def start(self, step: int, mesh: dict, precision: str, total_steps: int, setup_s: float,
              memory_before_model: list[int]) -> None:
        self.logger.log({"kind": "start", "step": step, "world_size": self.env.world_size, "mesh": mesh,
                         "n_params": self.counts["total"], "n_trainable": self.counts["trainable"],
                         "precision": precision, "peak_flops_per_rank": self.peak,
                         "peak_flops_source": self.peak_source, "total_steps": total_steps, "setup_s": setup_s,
                         "memory_before_model_bytes_per_rank": memory_before_model,
                         "allocator": allocator_in_use()})

    def step(self, state: TrainState, result: StepResult, seconds: float, seq_len: int, last: bool) -> None:
        self.profiler.step()
        if state.step % self.cfg.log.log_every == 0 or last:
            flops = flops_per_token(self.model_config, self.counts["total"], self.counts["trainable"], seq_len)
            self.logger.log({"kind": "train", "step": state.step, "epoch": state.epoch, "loss": result.loss,
                             "lr": result.lr, "grad_norm": result.grad_norm, "tokens": result.tokens,
                             "supervised_tokens": result.supervised_tokens, "tokens_per_s": result.tokens / seconds,
                             "supervised_tokens_per_s": result.supervised_tokens / seconds,
                             "mfu": flops * result.tokens / seconds / (self.peak * self.env.world_size),
                             "step_time_s": seconds, "peak_memory_bytes_per_rank": memory_per_rank(self.env)})
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")

    def eval(self, step: int, model, batches: list[dict]) -> dict:
        record = {"step": step, **evaluate(model, batches, self.env)}
        self.logger.log({"kind": "eval", **record})
        return record

    def close(self, summary: dict) -> None:
        self.profiler.close()
        if self.progress is not None:
            self.progress.close()
        self.logger.log(summary)
        self.logger.close()


# ----- the run -----------------------------------------------------------------------------------------

def train(cfg: Config, env: D.DistEnv) -> dict:
    started = time.perf_counter()
    if cfg.train.deterministic:
        D.enable_determinism()
    D.seed_everything(cfg.train.seed, env.rank)
    preflight.check_start(cfg, env)  # config, mesh, inputs, output folder, resume checkpoint: before any step
    resume_dir = resume_folder(cfg, env)
    cfg, source, tokenizer, model_config = setup_inputs(cfg, env, resume_dir)
    # Every row, before the model is built: bad rows, nothing supervised, token ids past the embedding.
    examples = preflight.check_data(cfg, env, tokenizer, model_config["vocab_size"])
    loader, sampler, evals, total_steps = setup_data(cfg, env, tokenizer, examples)
    out = Path(cfg.checkpoint.output_dir)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails preflight leaves nothing behind
    if env.is_main:
        print(f"resolved config (world size {env.world_size}, {env.backend}, {env.device}):\n{dump(cfg)}")
        (out / "config.yaml").write_text(dump(cfg), encoding="utf-8")

    # What the runtime and the data pipeline hold before the model exists (the start record): on CPU the
    # planner's --runtime-overhead, and the baseline training memory is measured from (tests/test_plan.py).
    memory_before_model = memory_per_rank(env, current_memory_bytes)
    model, precision, mesh_shape = build_sharded_model(cfg, env, source["hf_dir"], model_config)
    optimizer, scheduler = setup_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], total_steps)
    state = restore(resume_dir, model, optimizer, scheduler, cfg, env) if resume_dir else TrainState()
    faults.arm_kill_at_step(optimizer, state.step, env.rank, out)  # tests only; off unless its variable is set
    train_params = run_params(cfg, env, source, model_config, model)
    log = RunLog(cfg, env, model_config, train_params["param_counts"], precision, total_steps, state,
                 append=resume_dir is not None)
    log.start(step=state.step, mesh=mesh_shape, precision=precision, total_steps=total_steps,
              setup_s=time.perf_counter() - started, memory_before_model=memory_before_model)

    accum, stop_at = cfg.train.grad_accum_steps, min(total_steps, cfg.train.stop_after_steps or total_steps)
    losses, eval_results, saved_at, batches = [], [], -1, None
    while state.step < stop_at:
        if batches is None:  # a new epoch (or the resumed one): same order on every run for this epoch
            sampler.set_epoch(state.epoch)
            batches = islice(iter(loader), state.batch_in_epoch, None)
        micro_batches = list(islice(batches, accum))
        if len(micro_batches) < accum:  # epoch exhausted
            state.epoch, state.batch_in_epoch, batches = state.epoch + 1, 0, None
            continue
        start = time.perf_counter()
        result = train_step(model, micro_batches, optimizer, scheduler, env, cfg.train.max_grad_norm,
                            cfg.train.loss_chunk_size, cfg.fsdp.gather_once_per_step,
                            cfg.fsdp.activation_offload and env.device.type == "cuda", cfg.fsdp.reduce_every_micro_batch)
        seconds = time.perf_counter() - start
        state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + accum
        state.tokens_seen += result.tokens
        state.supervised_tokens_seen += result.supervised_tokens
        losses.append(result.loss)
        log.step(state, result, seconds, micro_batches[0]["input_ids"].shape[1], last=state.step == stop_at)
        if evals and cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
            eval_results.append(log.eval(state.step, model, evals))
        if cfg.checkpoint.save_every and state.step % cfg.checkpoint.save_every == 0:
            saved_at = save(cfg, state, model, optimizer, scheduler, train_params)

    if evals and (not eval_results or eval_results[-1]["step"] != state.step):
        eval_results.append(log.eval(state.step, model, evals))
    if (cfg.checkpoint.save_final or stop_at < total_steps) and saved_at != state.step:
        save(cfg, state, model, optimizer, scheduler, train_params)
    counts = train_params["param_counts"]
    summary = {"kind": "summary", "step": state.step, "losses": losses, "evals": eval_results,
               "n_params": counts["total"], "n_trainable": counts["trainable"]}
    log.close(summary)
    return summary


def run(cfg: Config) -> dict:
    """One training run in this process (under torchrun: this rank's part of it)."""
    env = D.setup(cfg.fsdp.backend)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return train(cfg, env)
    finally:  # leave the process as it was (notebooks and tests call run() more than once)
        torch.use_deterministic_algorithms(deterministic_before)
        D.teardown(env)


@command  # bad input (a UserError: config, data, model folder, preflight) -> one `error:` line on rank 0, exit 2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.finetune", description=__doc__.splitlines()[0],
                                     epilog="overrides: section.key=value, e.g. train.lr=1e-4 checkpoint.resume=auto")
    parser.add_argument("--config", help="a YAML recipe, e.g. cookbook/tiny_full.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)  # before any model is loaded: a typo costs a second
    run(config)
    return 0


if __name__ == "__main__":
    # A crash inside C++ (a collective, a kernel, process-group shutdown) then prints where each Python
    # thread was, instead of only a signal number in torchrun's summary. Only as a program: a caller of
    # main() (a test, a notebook) keeps its own stderr and signal handlers.
    faulthandler.enable()
    sys.exit(main())
