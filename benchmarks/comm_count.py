"""Benchmark: collectives per optimizer step, with and without fsdp.gather_once_per_step, against DDP.

    .venv/bin/python benchmarks/comm_count.py [--models tiny,smollm2] [--accums 2,4] [--rounds 3] [--steps 3]

Each measurement is one `torchrun --nproc_per_node 2` job (gloo, 1 thread per rank, the recipe's launch
command and so its malloc setting) that builds the recipe's model (finetune.build_sharded_model, fused AdamW,
finetune.train_step) or the Trainer's wrapping (DistributedDataParallel, benchmarks/_peer_worker.ddp_step)
on the same micro-batches (micro-batch 1 for SmolLM2 and 4 for tiny, 128 tokens, as train_compare.py):
  step 1        warm-up (AdamW states, first all-gathers);
  step 2        collectives counted by recipes_core.profiling.count_collectives (c10d ops, one per collective);
  steps 3..     timed (median step time) with each rank's RSS sampled every 2 ms (peak during these steps).
Settings run interleaved (off, on, ddp, off, on, off, on, ...) so a noisy neighbour hits all of them alike;
ratios on / off are taken per round and reported as median with min-max; DDP runs in the first round only
(its count, and a step time for scale). Counts do not vary between rounds. The profiler records no shape
for a collective over a list of tensors (DDP's bucketed all-reduces, dist.all_reduce): their bytes show as
0 and DDP's all-reduced bytes are given as its gradient bytes (every gradient once per step).
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
    """One job (under torchrun): build, warm up, count one step, time the next ones; rank 0 writes --out."""
    import torch
    import torch.distributed as dist

    from benchmarks._peer_worker import data, ddp_step
    from recipes_core import distributed as D
    from recipes_core.config import load_config
    from recipes_core.finetune import build_sharded_model, setup_optimizer, train_step
    from recipes_core.models import load_model_config
    from recipes_core.profiling import count_collectives

    p = argparse.ArgumentParser()
    for name in ("--mode", "--model-dir", "--out"):
        p.add_argument(name, required=True)
    for name in ("--accum", "--micro", "--seq", "--steps"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    args = p.parse_args(argv)
    args.examples, args.packing = 0, False

    with D.process_group("gloo") as env:
        examples, collate = data(args)
        batches = [collate(examples[(env.rank * args.accum + i) * args.micro:(env.rank * args.accum + i + 1) * args.micro])
                   for i in range(args.accum)]
        if args.mode == "ddp":
            from transformers import AutoModelForCausalLM

            model = torch.nn.parallel.DistributedDataParallel(
                AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).train())
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), fused=True)
            step = lambda: ddp_step(model, batches, optimizer)
        else:
            once = args.mode == "on"
            cfg = load_config("cookbook/tiny_full.yaml", ["model.source=hf", f"model.path={args.model_dir}",
                                                          f"train.lr={args.lr}",
                                                          f"fsdp.gather_once_per_step={str(once).lower()}"])
            model = build_sharded_model(cfg, env, args.model_dir, load_model_config(args.model_dir))[0]
            optimizer, scheduler = setup_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], 100)
            step = lambda: train_step(model, batches, optimizer, scheduler, env, max_grad_norm=1.0,
                                      gather_once_per_step=once)
        params = sum(p.numel() * p.element_size() for p in model.parameters())  # this rank's (sharded) bytes
        step()
        with count_collectives() as counted:
            step()
        dist.barrier()
        sampler, times = C.RssSampler(), []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak = sampler.stop()
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, {"peak_rss": peak, "param_bytes": params})
        if env.rank == 0:
            Path(args.out).write_text(json.dumps({
                "calls": counted.calls, "bytes": counted.bytes, "total": counted.total, "step_times": times,
                "median_step_s": statistics.median(times), "peak_rss_per_rank": [g["peak_rss"] for g in gathered],
                "param_bytes_per_rank": [g["param_bytes"] for g in gathered]}))


def model_dir(name: str) -> Path:
    if name == "smollm2":  # converted once, beside the GGUF (as benchmarks/chunked_loss.py)
        from recipes_core.models import gguf_to_hf

        return gguf_to_hf(os.environ.get("SMOLLM2_GGUF", C.SMOLLM2_GGUF))
    return C.tiny_dir()


def run_one(model: str, accum: int, mode: str, steps: int, tag: str) -> dict:
    s = SETTINGS[model]
    out = C.RUNS / f"comm_{model}_{accum}_{mode}_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = ["--worker", "--mode", mode, "--model-dir", model_dir(model), "--out", out, "--accum", accum,
            "--micro", s["micro"], "--seq", s["seq"], "--steps", steps, "--lr", s["lr"]]
    C.run_cmd(C.torchrun(2, None, args, script=Path(__file__)), threads=1)
    return json.loads(out.read_text())


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}x ({min(values):.3f}-{max(values):.3f})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--accums", default="2,4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=str(C.RESULTS_DIR / "comm_count.json"))
    args = p.parse_args(argv)
    report = []
    for model in args.models.split(","):
        for accum in [int(a) for a in args.accums.split(",")]:
            runs = {mode: [] for mode in MODES}
            for r in range(args.rounds):
                for mode in MODES if r == 0 else MODES[:2]:  # DDP's count and time once: the figures compare on/off
                    runs[mode].append(run_one(model, accum, mode, args.steps, str(r)))
            off, on, ddp = runs["off"][0], runs["on"][0], runs["ddp"][0]
            row = {"model": model, "accum": accum,
                   **{f"{mode} collectives": runs[mode][0]["total"] for mode in MODES},
                   **{f"{mode} calls": runs[mode][0]["calls"] for mode in MODES},
                   **{f"{mode} MiB": {k: round(v / 2**20, 1) for k, v in runs[mode][0]["bytes"].items()} for mode in MODES},
                   "on/off step time": spread([a["median_step_s"] / b["median_step_s"] for a, b in zip(runs["on"], runs["off"])]),
                   "ddp/off step time (round 1)": spread([a["median_step_s"] / b["median_step_s"] for a, b in zip(runs["ddp"], runs["off"])]),
                   "DDP all-reduce MiB (every gradient once)": round(runs["ddp"][0]["param_bytes_per_rank"][0] / 2**20, 1),
                   **{f"on/off peak RSS rank{i}": spread([a["peak_rss_per_rank"][i] / b["peak_rss_per_rank"][i]
                                                          for a, b in zip(runs["on"], runs["off"])]) for i in (0, 1)},
                   **{f"{mode} peak RSS MiB rank1 (median)": round(statistics.median(x["peak_rss_per_rank"][1] for x in runs[mode]) / 2**20)
                      for mode in MODES},
                   **{f"{mode} step s (median of rounds)": round(statistics.median(x["median_step_s"] for x in runs[mode]), 3)
                      for mode in MODES},
                   "runs": runs}
            report.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"machine": C.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                                                  "command": C.command_line(), "rows": report}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
