"""Benchmark: collectives per optimizer step, with and without fsdp.gather_once_per_step, against DDP.

    .venv/bin/python benchmarks/comm_count.py [--models tiny,smollm2] [--accums 2,4] [--rounds 3] [--steps 3]

One `torchrun --nproc_per_node 2` job per model and accumulation (gloo, 1 thread per rank, the recipe's launch
command and so its malloc setting) builds three settings side by side on the same micro-batches (micro-batch 1
for SmolLM2 and 4 for tiny, 128 tokens, as train_compare.py):
  off   the recipe's model and step (finetune.build_sharded_model, fused AdamW, finetune.train_step);
  on    the same with fsdp.gather_once_per_step=true;
  ddp   the Trainer's wrapping (DistributedDataParallel, benchmarks/_peer_worker.ddp_step: no_sync until the
        last micro-batch), for scale.
Each is warmed up by one step, then one step's collectives are counted by recipes_core.profiling.count_collectives
(c10d ops: one per collective, whichever API issued it). Then rounds of --steps steps run interleaved
(off, on, ddp, off, on, ddp, ...) so a noisy neighbour hits all of them alike; per round: the mean step
time, and each rank's RSS sampled every 2 ms: peak during the steps and the step's increment (peak minus the
RSS before them: what the step holds above the persistent state, the unsharded parameters among it; the three
models live in one process, so the absolute peaks include all three). Ratios on / off per round, median with
min-max. Counts do not vary between steps. The profiler records no shape for a collective over a list of
tensors (DDP's bucketed all-reduces, dist.all_reduce): those add calls but no bytes; DDP all-reduces every
gradient once per step (its bytes are the model's fp32 parameter bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402

SETTINGS = {"tiny": dict(seq=128, micro=4, lr=3e-3), "smollm2": dict(seq=128, micro=1, lr=2e-5)}
MODES = ("off", "on", "ddp")


def worker(argv: list[str]) -> None:
    """One job (under torchrun): build the three settings side by side, warm each up and count one step of
    each, then time them in interleaved rounds; rank 0 writes --out."""
    import torch
    import torch.distributed as dist

    from benchmarks._peer_worker import data, ddp_step
    from recipes_core import distributed as D
    from recipes_core.config import load_config
    from recipes_core.finetune import build_sharded_model, setup_optimizer, train_step
    from recipes_core.models import load_model_config
    from recipes_core.profiling import count_collectives

    p = argparse.ArgumentParser()
    for name in ("--model-dir", "--out"):
        p.add_argument(name, required=True)
    for name in ("--accum", "--micro", "--seq", "--steps", "--rounds"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    args = p.parse_args(argv)
    args.examples, args.packing = 0, False

    def build(mode: str):
        """A step function of the recipe's model (mode off / on) or of the Trainer's DDP wrapping."""
        if mode == "ddp":
            from transformers import AutoModelForCausalLM

            model = torch.nn.parallel.DistributedDataParallel(
                AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).train())
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), fused=True)
            return lambda: ddp_step(model, batches, optimizer)
        once = mode == "on"
        cfg = load_config("cookbook/tiny_full.yaml", ["model.source=hf", f"model.path={args.model_dir}",
                                                      f"train.lr={args.lr}", f"fsdp.gather_once_per_step={str(once).lower()}"])
        model = build_sharded_model(cfg, env, args.model_dir, load_model_config(args.model_dir))[0]
        optimizer, scheduler = setup_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], 1000)
        return lambda: train_step(model, batches, optimizer, scheduler, env, max_grad_norm=1.0, gather_once_per_step=once)

    with D.process_group("gloo") as env:
        examples, collate = data(args)
        batches = [collate(examples[(env.rank * args.accum + i) * args.micro:(env.rank * args.accum + i + 1) * args.micro])
                   for i in range(args.accum)]
        steps = {mode: build(mode) for mode in MODES}
        result = {mode: {"step_s": [], "rss_increment": [], "rss_peak": []} for mode in MODES}
        for mode, step in steps.items():
            step()  # warm-up: AdamW states, first all-gathers
            with count_collectives() as counted:
                step()
            result[mode].update(calls=counted.calls, bytes=counted.bytes, total=counted.total)
        for _ in range(args.rounds):
            for mode, step in steps.items():
                dist.barrier()
                before, sampler = C.rss_bytes(), C.RssSampler()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                seconds = (time.perf_counter() - start) / args.steps
                peak = sampler.stop()
                per_rank = [None] * env.world_size
                dist.all_gather_object(per_rank, (peak - before, peak))
                result[mode]["step_s"].append(seconds)
                result[mode]["rss_increment"].append([r[0] for r in per_rank])
                result[mode]["rss_peak"].append([r[1] for r in per_rank])
        if env.rank == 0:
            Path(args.out).write_text(json.dumps(result))


def model_dir(name: str) -> Path:
    if name == "smollm2":  # converted once, beside the GGUF (as benchmarks/chunked_loss.py)
        from recipes_core.models import gguf_to_hf

        return gguf_to_hf(os.environ.get("SMOLLM2_GGUF", C.SMOLLM2_GGUF))
    return C.tiny_dir()


def run_job(model: str, accum: int, rounds: int, steps: int) -> dict:
    s = SETTINGS[model]
    out = C.RUNS / f"comm_{model}_{accum}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = ["--worker", "--model-dir", model_dir(model), "--out", out, "--accum", accum, "--micro", s["micro"],
            "--seq", s["seq"], "--steps", steps, "--rounds", rounds, "--lr", s["lr"]]
    C.run_cmd(C.torchrun(2, None, args, script=Path(__file__)), threads=1, timeout=3600)
    return json.loads(out.read_text())


def spread(values: list[float], unit: str = "x", digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summary(model: str, accum: int, r: dict) -> dict:
    mib = lambda b: round(b / 2**20, 1)
    row = {"model": model, "accum": accum}
    for mode in MODES:
        row[f"{mode}: collectives"] = r[mode]["total"]
        row[f"{mode}: calls"] = r[mode]["calls"]
        row[f"{mode}: MiB (all-gather output, reduce-scatter input)"] = {k: mib(v) for k, v in r[mode]["bytes"].items() if v}
        if not r[mode]["step_s"]:  # --rounds 0: counts only
            continue
        row[f"{mode}: step s"] = spread(r[mode]["step_s"], " s")
        for rank in (0, 1):
            row[f"{mode}: step RSS increment rank{rank} MiB"] = spread([x[rank] / 2**20 for x in r[mode]["rss_increment"]], "", 0)
    if not r["off"]["step_s"]:
        return row
    ratio = lambda a, b: [x / y for x, y in zip(a, b)]
    row["on / off step time"] = spread(ratio(r["on"]["step_s"], r["off"]["step_s"]))
    row["ddp / off step time"] = spread(ratio(r["ddp"]["step_s"], r["off"]["step_s"]))
    for rank in (0, 1):
        row[f"on - off step RSS increment rank{rank} MiB"] = spread(
            [(a[rank] - b[rank]) / 2**20 for a, b in zip(r["on"]["rss_increment"], r["off"]["rss_increment"])], "", 0)
        row[f"on / off peak RSS rank{rank}"] = spread(ratio([x[rank] for x in r["on"]["rss_peak"]],
                                                            [x[rank] for x in r["off"]["rss_peak"]]))
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--accums", default="2,4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(C.RESULTS_DIR / "comm_count.json"))
    args = p.parse_args(argv)
    report = []
    for model in args.models.split(","):
        for accum in [int(a) for a in args.accums.split(",")]:
            raw = run_job(model, accum, args.rounds, args.steps)
            row = summary(model, accum, raw)
            print(json.dumps(row), flush=True)
            report.append({**row, "raw": raw})
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"machine": C.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                                                  "command": C.command_line(), "rows": report}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
