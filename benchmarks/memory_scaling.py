"""Benchmark 6: per-rank training memory for 1, 2 and 4 FSDP2 ranks against the memory planner.

    .venv/bin/python benchmarks/memory_scaling.py [--model smollm2] [--ranks 1,2,4] [--rounds 3] [--smoke]

Each rank (this file under torchrun, 1 thread per rank) builds the model exactly as the recipe does
(`recipes_core.finetune.build_sharded_model`: meta device, fully_shard per decoder layer, rank 0's full
weights broadcast into the shards), then runs the recipe's training step (`train_step`: its loss,
clipping, fused AdamW from `setup_optimizer`) on a fixed batch.

Method (CPU has no allocator statistics in torch 2.13, and ru_maxrss cannot be reset):
  baseline  = RSS right after imports and process-group start, before the model exists;
  peak      = highest RSS sampled every 2 ms by a thread during the training steps only (so rank 0's
              load-time full copy, freed before training, is not counted);
  measured  = peak - baseline.
Prediction per rank: the memory planner's (recipes_core.plan.plan, --device cpu, fp32): the larger of
backward's start (parameters + AdamW + activations + loss/logits + FSDP working set) and backward's end
(parameters + gradients + AdamW + the root group's reduce-scatter); its module docstring explains each term.
The activations autograd really saves in one micro-batch (counted with saved_tensors_hooks in the same run,
the loss's included) are reported next to the planner's, and the issue's formula (16 P / N + activations)
too. Each rank count runs once per round (1, 2, 4, 1, 2, 4, ...); a ratio is the median over rounds of the
worst rank's measured / planner, with min-max.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402

SETTINGS = dict(seq=128, micro=1, steps=2)
# Allocators (recipes_core/launch.py): the launcher's mimalloc returns freed pages at once; glibc with
# MALLOC_ENV gives every block above 128 KiB its own mapping; glibc's default raises its threshold as large
# blocks are freed (up to 32 MiB), after which FSDP's per-layer buffers (~14 MiB for SmolLM2) come from
# malloc arenas and stay resident when freed.
from recipes_core import plan as P  # noqa: E402
from recipes_core.launch import MALLOC_ENV  # noqa: E402  (glibc's setting in the launch command)


def saved_activation_bytes(model, batch, device) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward of the recipe's loss."""
    import torch

    from recipes_core.finetune import token_loss_sum

    storages = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if base.is_leaf and base.requires_grad:  # a parameter (or a view of one): not an activation
            return t
        if t.device.type == "cpu":
            try:
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = token_loss_sum(model, batch, device)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()), storages


def worker(model_name: str, seq: int, micro: int, steps: int) -> dict:
    import torch
    import torch.distributed as dist

    from recipes_core import distributed as D
    from recipes_core.config import load_config
    from recipes_core.finetune import build_sharded_model, setup_optimizer, train_step
    from recipes_core.models import load_model_config

    with D.process_group("gloo") as env:
        gc.collect()
        baseline = C.rss_bytes()
        hf_dir = D.broadcast_object(str(C.model_dir(model_name)) if env.is_main else None)
        cfg = load_config("cookbook/tiny_full.yaml", ["model.source=hf", f"model.path={hf_dir}", "train.lr=1e-5"])
        model_config = load_model_config(hf_dir)
        model = build_sharded_model(cfg, env, hf_dir, model_config)[0]
        gc.collect()
        after_load = C.rss_bytes()
        optimizer, scheduler = setup_optimizer(cfg, list(model.parameters()), steps)  # the recipe's fused AdamW
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model_config["vocab_size"], (micro, seq), generator=g)
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        n_params = sum(p.numel() for p in model.parameters())  # global numel of the DTensor parameters
        sampler = C.RssSampler()
        peaks = {"fwd_bwd": 0, "optim": 0}

        def forward_backward_done(*_):  # an optimizer pre-hook: the step's forward and backward are over
            peaks["fwd_bwd"] = max(peaks["fwd_bwd"], sampler.peak, C.rss_bytes())
            sampler.reset()

        optimizer.register_step_pre_hook(forward_backward_done)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            sampler.reset()
            train_step(model, [batch], optimizer, scheduler, env, max_grad_norm=1.0)
            peaks["optim"] = max(peaks["optim"], sampler.peak, C.rss_bytes())
            times.append(time.perf_counter() - start)
        sampler.stop()
        activations, _ = saved_activation_bytes(model, batch, env.device)  # after the measured steps
        layers = D.decoder_layers(model)
        layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
        root_params = n_params - sum(sum(p.numel() for p in layer.parameters()) for layer in layers)
        result = {"rank": env.rank, "world_size": env.world_size, "baseline": baseline, "after_load": after_load,
                  "peak": max(peaks.values()), "peak_fwd_bwd": peaks["fwd_bwd"], "peak_optim": peaks["optim"],
                  "n_params": n_params, "activations": activations, "layer_params": layer_params,
                  "root_params": root_params, "step_times": times}
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, result)
        return {"ranks": gathered}


def prediction(r: dict, shape, seq: int, micro: int) -> dict:
    """The planner's prediction for this rank's run (one source of truth: recipes_core.plan)."""
    from recipes_core import plan as P

    predicted = P.plan(shape, r["world_size"], micro, seq, "fp32", device="cpu")
    states = 16 * r["n_params"] / r["world_size"]
    return {"states": states, "activations": r["activations"], "planner": predicted,
            "planner_activations": predicted["parts"]["activations"] + predicted["parts"]["loss/logits"],
            "total": predicted["device"], "issue_formula": states + r["activations"]}


def main(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--glibc-default", action="store_true",
                        help="glibc's malloc, untuned (freed memory may stay resident in its arenas)")
    parser.add_argument("--glibc-threshold", action="store_true",
                        help="glibc's malloc with MALLOC_ENV (RECIPES_ALLOCATOR=glibc), the launchers' setting before mimalloc")
    parser.add_argument("--reuse", action="store_true", help="re-render from the last worker outputs in runs/bench")
    parser.add_argument("--worker-out", help="internal: run as a torchrun worker")
    args = parser.parse_args(argv)
    s = dict(SETTINGS)
    if args.worker_out:
        out = worker(args.model, s["seq"], s["micro"], s["steps"])
        if int(os.environ.get("RANK", 0)) == 0:
            Path(args.worker_out).write_text(json.dumps(out))
        return None
    model = "tiny" if args.smoke else args.model
    variant = "glibc_default" if args.glibc_default else "glibc_threshold" if args.glibc_threshold else "mimalloc"
    suffix = "" if variant == "mimalloc" else f"_{variant}"
    ranks = [1] if args.smoke else [int(x) for x in args.ranks.split(",")]
    if args.smoke:
        s.update(seq=32, steps=1)
    rows, ratios, measured, predicted = [], [], [], []
    rounds = 1 if args.smoke else args.rounds
    shape = P.resolve_model(str(C.model_dir(model)))[1]
    worst = {n: [] for n in ranks}  # per round: (measured, planner) of the rank furthest from the planner
    for i in range(rounds):
        for n in ranks:
            if args.smoke:
                data = worker(model, s["seq"], s["micro"], s["steps"])
            else:
                out = C.RUNS / f"memory_{model}_{n}_{variant}_round{i + 1}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                if not (args.reuse and out.exists()):
                    # The recipe's launcher preloads mimalloc (recipes_core.launch.allocator_env); the glibc
                    # variants turn that off, --glibc-default also drops launch_command's MALLOC_ENV.
                    env = {"RECIPES_ALLOCATOR": "glibc"} if variant != "mimalloc" else {}
                    C.run_cmd(C.torchrun(n, "benchmarks.memory_scaling", ["--model", model, "--worker-out", out],
                                         malloc_env=not args.glibc_default), threads=1, env_extra=env)
                data = json.loads(out.read_text())
            per_rank = []
            for r in data["ranks"]:
                assert shape.params == r["n_params"], (shape.params, r["n_params"])
                a = prediction(r, shape, s["seq"], s["micro"])
                got = r["peak"] - r["baseline"]
                per_rank.append((got, a["total"]))
                rows.append({"round": i + 1, "ranks": n, "rank": r["rank"], "baseline RSS (MiB)": r["baseline"] / 2**20,
                             "peak in fwd+bwd (MiB)": (r["peak_fwd_bwd"] - r["baseline"]) / 2**20,
                             "peak in optimizer step (MiB)": (r["peak_optim"] - r["baseline"]) / 2**20, "measured = peak - baseline (MiB)": got / 2**20,
                             "16P/N (MiB)": a["states"] / 2**20, "activations counted (MiB)": a["activations"] / 2**20,
                             "planner: activations + loss/logits (MiB)": a["planner_activations"] / 2**20,
                             "planner: backward start (MiB)": a["planner"]["moments"]["backward start"] / 2**20,
                             "planner: backward end (MiB)": a["planner"]["moments"]["backward end"] / 2**20,
                             "planner (MiB)": a["total"] / 2**20, "measured / planner": got / a["total"],
                             "measured / (16P/N + activations)": got / a["issue_formula"]})
            worst[n].append(max(per_rank, key=lambda x: abs(x[0] / x[1] - 1)))
            print(f"  round {i + 1}, {n} rank(s): measured / planner {worst[n][-1][0] / worst[n][-1][1]:.3f} (worst rank)",
                  flush=True)
    for n in ranks:
        rel = [got / planned for got, planned in worst[n]]
        mid = statistics.median(rel)
        ratios.append(C.ratio(f"{model}, {n} rank(s): measured / planner (worst rank)", mid,
                              "within 15% (0.85-1.15x)", all(0.85 <= x <= 1.15 for x in rel),
                              f"median of {len(rel)} round(s), min {min(rel):.3f}, max {max(rel):.3f}; met only if "
                              "every round is within 15%"))
        measured.append(statistics.median(got for got, _ in worst[n]) / 2**20)
        predicted.append(worst[n][0][1] / 2**20)
    plot = C.bar_plot(C.plot_path("memory_scaling" + suffix, args.smoke), f"Per-rank training memory, {model} (rank furthest from the planner, median of rounds)",
                      [f"{n} rank(s)" for n in ranks], {"measured (peak RSS - baseline)": measured,
                                                        "planner (recipes_core.plan)": predicted}, "MiB")
    notes = [
        "Method: baseline = RSS after imports and process-group start; peak = highest RSS sampled every 2 ms "
        "by a thread during the training steps only; measured = peak - baseline. torch 2.13 has no CPU "
        "allocator statistics, and ru_maxrss cannot be reset, so it would include rank 0's load-time full copy.",
        "Prediction = the memory planner's (recipes_core.plan, --device cpu, fp32): the larger of backward's start "
        "(parameters + AdamW + activations + loss/logits + FSDP working set: root group and two layers gathered, "
        "the lm_head's and one layer's unsharded gradients, their reduce-scatter input and gloo's copy of it) and "
        "backward's end (parameters + gradients + AdamW + the root group's reduce-scatter). 'activations counted' "
        "are the storages autograd saves in one micro-batch (saved_tensors_hooks, same run); the last column is "
        "the issue's formula, 16P/N + those activations.",
        f"Batch: {s['micro']} x {s['seq']} random tokens per rank, {s['steps']} AdamW steps, fp32, 1 thread per rank.",
    ]
    name = "memory_scaling" + suffix
    title = "6. Memory scaling: per-rank memory vs the memory planner" + {
        "mimalloc": "", "glibc_default": ", glibc malloc defaults",
        "glibc_threshold": f", glibc with {MALLOC_ENV}"}[variant]
    notes.append({"glibc_default": "Allocator: glibc defaults (no tuning; RECIPES_ALLOCATOR=glibc, no MALLOC_ENV).",
                  "glibc_threshold": f"Allocator: glibc with {MALLOC_ENV} (RECIPES_ALLOCATOR=glibc), the launchers' "
                                     "setting before mimalloc: every block above 128 KiB its own mapping.",
                  "mimalloc": "Allocator: the launcher's mimalloc with MIMALLOC_PURGE_DELAY=0 (recipes_core.launch."
                              "allocator_env), as users get it; the glibc variants are sections "
                              "memory_scaling_glibc_threshold and memory_scaling_glibc_default."}[variant])
    return C.save_result(name, title, C.command_line(),
                         {"model": model, "ranks": ranks, "rounds": rounds, **s, "optimizer": "AdamW fused=True (the recipe's)"}, rows, ratios, notes, args.smoke, plot)


if __name__ == "__main__":
    main()
