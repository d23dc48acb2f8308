"""The peers our recipe is compared with, doing the same training work (run by train_compare.py):

  --route trainer  Hugging Face `Trainer` (launch under torchrun: on CPU it wraps the model in
                   DistributedDataParallel over gloo; the route records which wrapper it really used)
  --route plain    a single-process plain PyTorch loop (model(**batch).loss, backward, clip, AdamW)
  --route profile-fsdp, profile-fsdp-noreshard, profile-fsdp-once, profile-ddp
                   one profiled step: the recipe's own (recipes_core.finetune.train_step) or the Trainer's DDP

Same model folder, same tokenized examples and collation as recipes_core.finetune (its own
`tokenized` and collate functions), same sequence length, global batch, AdamW betas, lr schedule
family, gradient clipping and fp32. Writes one JSON line per optimizer step to --out (rank 0) with the
step time and the tokens of the whole global batch, then a summary line with each rank's peak RSS
(the profile routes: one JSON summary of the profiled step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import max_rss_bytes, profile_summary, rss_bytes  # noqa: E402
from recipes_core.config import load_config  # noqa: E402
from recipes_core.finetune import collate_fn, supervised_tokens, tokenized  # noqa: E402
from recipes_core.tokens import load_tokenizer  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--route", choices=("trainer", "plain", "profile-fsdp", "profile-fsdp-noreshard", "profile-fsdp-once", "profile-ddp"), required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--examples", type=int, default=0)
    p.add_argument("--packing", action="store_true")
    return p.parse_args(argv)


def data(args):
    cfg = load_config("cookbook/tiny_full.yaml", [f"data.max_seq_len={args.seq}", f"data.packing={str(args.packing).lower()}"])
    tokenizer = load_tokenizer(args.model_dir)
    examples = tokenized(cfg.data.train_path, cfg, tokenizer, args.examples)
    return examples, collate_fn(cfg, tokenizer.pad_token_id)


class CountingCollate:
    """The recipe's collate function, noting (tokens, supervised tokens) of every batch it builds."""

    def __init__(self, collate):
        self.collate, self.counts = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.counts.append((batch["input_ids"].numel(), supervised_tokens(batch)))
        return batch


def train_with_trainer(args, accum: int, lr: float, callbacks=()):
    """The Trainer route, shared by train_compare (CPU: DDP over gloo under torchrun) and cuda_train_compare
    (one GPU, bf16 autocast). Same settings otherwise: fused AdamW (the Trainer's default on torch >= 2.8,
    written out), cosine schedule, clipping at 1.0, no saving, no logging. Returns the trainer, each step's
    wall time (GPU synchronised at both ends) and each batch's (tokens, supervised tokens)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    examples, collate = data(args)
    counting = CountingCollate(collate)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    times = []

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.begin = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            times.append(time.perf_counter() - self.begin)

    training_args = TrainingArguments(
        output_dir=str(Path(args.out).parent / "trainer_out"), per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=accum, max_steps=args.steps, learning_rate=lr, adam_beta1=0.9,
        adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=0,
        bf16=cuda, optim="adamw_torch_fused", use_cpu=not cuda, save_strategy="no", eval_strategy="no",
        report_to="none", logging_steps=10**6, disable_tqdm=True, dataloader_drop_last=True,
        remove_unused_columns=False, dataloader_num_workers=0, seed=42,
        ddp_backend="gloo" if "RANK" in os.environ and not cuda else None)
    trainer = Trainer(model=model, args=training_args, train_dataset=Dataset.from_list(examples),
                      data_collator=counting, callbacks=[StepTimer(), *callbacks])
    trainer.train()
    return trainer, times, counting.counts


def run_trainer(args):
    trainer, times, counts = train_with_trainer(args, args.accum, args.lr)
    wrapper = type(trainer.model_wrapped).__name__
    parallel = f"{wrapper} ({trainer.args.parallel_mode.value}, backend {torch.distributed.get_backend() if torch.distributed.is_initialized() else 'none'})"
    return times, counts, parallel


def run_plain(args):
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    torch.manual_seed(42)
    examples, collate = data(args)
    counting = CountingCollate(collate)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    loader = iter(DataLoader(examples, batch_size=args.micro, shuffle=True, collate_fn=counting, drop_last=True))
    times = []
    for _ in range(args.steps):
        batches = [next(loader) for _ in range(args.accum)]
        start = time.perf_counter()
        for batch in batches:
            loss = model(**batch, use_cache=False).loss / args.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times, counting.counts, "none (one process)"


def run_profile(args) -> None:
    """One optimizer step (accum micro-batches, clip, fused AdamW), profiled on rank 0 after --steps - 1
    warm-up steps: the recipe's own model, optimizer and step (profile-fsdp: build_sharded_model,
    setup_optimizer, train_step; profile-fsdp-noreshard: the same with fsdp.reshard_after_forward=false;
    profile-fsdp-once: with fsdp.gather_once_per_step=true, as smollm2_full.yaml ships)
    or the Trainer's wrapping (profile-ddp: DistributedDataParallel over gloo, model(**batch).loss).
    Writes a JSON summary (wall time and its split: matmuls, collectives, optimizer, other) and the op table."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from recipes_core import distributed as D
    from recipes_core.finetune import build_sharded_model, setup_optimizer, train_step
    from recipes_core.models import load_model_config

    with D.process_group("gloo") as env:
        examples, collate = data(args)
        batches = [collate(examples[(env.rank * args.accum + i) * args.micro:(env.rank * args.accum + i + 1) * args.micro])
                   for i in range(args.accum)]
        if args.route.startswith("profile-fsdp"):  # exactly the recipe's model, optimizer and step
            reshard = str(args.route != "profile-fsdp-noreshard").lower()
            once = args.route == "profile-fsdp-once"
            cfg = load_config("cookbook/tiny_full.yaml", ["model.source=hf", f"model.path={args.model_dir}",
                              f"train.lr={args.lr}", f"fsdp.reshard_after_forward={reshard}",
                              f"fsdp.gather_once_per_step={str(once).lower()}"])
            model = build_sharded_model(cfg, env, args.model_dir, load_model_config(args.model_dir))[0]
            optimizer, scheduler = setup_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], args.steps)
            step = lambda: train_step(model, batches, optimizer, scheduler, env, max_grad_norm=1.0,
                                      gather_once_per_step=once)
        else:
            from transformers import AutoModelForCausalLM

            model = torch.nn.parallel.DistributedDataParallel(
                AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).train(), find_unused_parameters=True)
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
            step = lambda: ddp_step(model, batches, optimizer)

        for _ in range(max(1, args.steps - 1)):
            step()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            wall = time.perf_counter() - start
        dist.barrier()
        if env.rank == 0:
            Path(args.out).write_text(json.dumps({"wall_s": wall, **profile_summary(prof.key_averages())}))


def ddp_step(model, batches, optimizer) -> None:
    """The Trainer's step under DDP: mean loss per micro-batch, gradients all-reduced on the last one."""
    for i, batch in enumerate(batches):
        with model.no_sync() if i < len(batches) - 1 else contextlib.nullcontext():
            (model(**batch, use_cache=False).loss / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv=None):
    args = parse(argv)
    if args.route.startswith("profile"):
        return run_profile(args)
    rss_after_imports = rss_bytes()
    times, counts, parallel = (run_trainer if args.route == "trainer" else run_plain)(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = torch.tensor([[c[0] for c in counts[:len(times) * args.accum]],
                          [c[1] for c in counts[:len(times) * args.accum]]], dtype=torch.float64)
    memory = [max_rss_bytes()]
    if world > 1:
        import torch.distributed as dist

        torch.distributed.all_reduce(local)  # tokens of the global batch
        gathered = [None] * world
        dist.all_gather_object(gathered, max_rss_bytes())
        memory = gathered
    if rank != 0:
        return
    with open(args.out, "w", encoding="utf-8") as f:
        for i, seconds in enumerate(times):
            sl = slice(i * args.accum, (i + 1) * args.accum)
            f.write(json.dumps({"kind": "train", "step": i + 1, "step_time_s": seconds,
                                "tokens": int(local[0, sl].sum()), "supervised_tokens": int(local[1, sl].sum())}) + "\n")
        f.write(json.dumps({"kind": "summary", "parallelism": parallel, "world_size": world,
                            "peak_memory_bytes_per_rank": memory, "rss_after_imports": rss_after_imports}) + "\n")


if __name__ == "__main__":
    main()
