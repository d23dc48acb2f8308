"""Benchmark 1: training throughput of our recipe against what users would run instead.

    .venv/bin/python benchmarks/train_compare.py [--models tiny,smollm2] [--smoke]   (one section per model)
    .venv/bin/python benchmarks/train_compare.py --profile [--models tiny,smollm2]    (section 1b: one profiled step)

Routes, all on the same model folder, tokenized examples, sequence length, global batch, AdamW
(betas 0.9/0.95, no weight decay), cosine schedule, grad-norm clipping at 1.0 and fp32:
  ours     torchrun --nproc_per_node 2 -m recipes_core.finetune  (FSDP2, gloo), 1 thread per rank
  trainer  torchrun --nproc_per_node 2 benchmarks/_peer_worker.py --route trainer (HF Trainer), 1 thread per rank
  plain    one process, plain PyTorch loop (benchmarks/_peer_worker.py --route plain), 1 thread
Throughput is sum(tokens) / sum(step times) over the steps after the warm-up ones; each route times
one optimizer step the same way (forward/backward of every micro-batch, clipping, optimizer step).
"""

from __future__ import annotations

import json
import sys
from statistics import median
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402

SETTINGS = {  # per model: sequence length, micro-batch per rank, accumulation (2 ranks), steps, warm-up steps, lr
    "tiny": dict(seq=128, micro=4, accum=2, steps=12, skip=2, lr=3e-3),
    "smollm2": dict(seq=128, micro=1, accum=2, steps=4, skip=1, lr=2e-5),
}
SMOKE = dict(seq=64, micro=2, accum=1, steps=2, skip=1, lr=3e-3, examples=32)
# Ours runs each model's own cookbook recipe, as a user gets it (its fsdp section: smollm2_full.yaml keeps
# the parameters gathered through the step), on the peers' data (tiny_full.yaml's Alpaca file) and shape.
RECIPES = {"tiny": "cookbook/tiny_full.yaml", "smollm2": "cookbook/smollm2_full.yaml"}
SAME_DATA = ["data.format=alpaca", "data.train_path=cookbook/data/alpaca_train.jsonl", "train.weight_decay=0.0"]
# Ours with other launcher or recipe settings, against the defaults: (route name, environment, overrides).
VARIANTS = {
    "tiny": [("ours, glibc (before: MALLOC_MMAP_THRESHOLD_)", {"RECIPES_ALLOCATOR": "glibc"}, [])],
    "smollm2": [("ours, glibc (MALLOC_MMAP_THRESHOLD_)", {"RECIPES_ALLOCATOR": "glibc"}, []),
                ("ours, before (glibc threshold, gather_once_per_step off)", {"RECIPES_ALLOCATOR": "glibc"},
                 ["fsdp.gather_once_per_step=false"])],
}


def run_ours(model: str, s: dict, nproc: int = 2, env: dict | None = None, overrides: list[str] = (),
             tag: str = "") -> dict:
    out = C.RUNS / f"train_finetune_{model}_{nproc}{tag}"
    extra = [f"model.source=hf", f"model.path={C.model_dir(model)}", f"data.max_seq_len={s['seq']}",
             f"train.micro_batch_size={s['micro']}", f"train.grad_accum_steps={s['accum']}", f"train.lr={s['lr']}",
             "train.warmup_steps=0", "train.lr_schedule=cosine", "train.seed=42",
             f"data.max_train_examples={s.get('examples', 0)}", *SAME_DATA, *s.get("extra", []), *overrides]
    recipe = RECIPES[model]
    if nproc:
        C.run_cmd(C.torchrun(nproc, "recipes_core.finetune", C.finetune_overrides(out, s["steps"], extra, recipe)),
                  threads=1, env_extra=env)
        start, steps = C.read_finetune_metrics(out)
    else:  # smoke: one process, in this process
        start, steps = C.finetune_inprocess(out, s["steps"], extra, recipe)
    row = C.steady_throughput(steps, s["skip"])
    row["peak_memory_bytes_per_rank"] = steps[-1]["peak_memory_bytes_per_rank"]
    row["parallelism"] = (f"FSDP2 fully_shard ({nproc} ranks, gloo, {start.get('allocator', 'glibc')})" if nproc
                          else "FSDP2, group of one (in-process smoke)")
    row["start"], row["steps"] = start, steps
    return row


def run_peer(route: str, model: str, s: dict, inprocess: bool = False, threads: int = C.TOTAL_THREADS) -> dict:
    out = C.RUNS / f"train_{route}_{model}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    nproc = 2 if route == "trainer" and not inprocess else 0
    accum = s["accum"] if nproc else s["accum"] * 2  # same global batch as two ranks
    args = ["--route", route, "--model-dir", C.model_dir(model), "--out", out, "--steps", s["steps"],
            "--micro", s["micro"], "--accum", accum, "--seq", s["seq"], "--lr", s["lr"],
            "--examples", s.get("examples", 0)]
    if inprocess:
        from benchmarks import _peer_worker

        _peer_worker.main([str(a) for a in args])
    else:  # the Trainer under torchrun, the plain loop as one process (nproc 0); glibc's malloc defaults, as
        # plain torchrun leaves them (our launcher would preload mimalloc: RECIPES_ALLOCATOR=glibc turns it off)
        C.run_cmd(C.torchrun(nproc, None, args, malloc_env=False, script=C.BENCH / "_peer_worker.py"),
                  threads=1 if nproc else threads, env_extra={"RECIPES_ALLOCATOR": "glibc"})
    records = [json.loads(line) for line in out.read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    summary = records[-1]
    row = C.steady_throughput(steps, s["skip"])
    row["peak_memory_bytes_per_rank"] = summary["peak_memory_bytes_per_rank"]
    row["parallelism"] = summary["parallelism"]
    return row


def main(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--rounds", type=int, default=3, help="every route once per round, interleaved")
    parser.add_argument("--profile", action="store_true",
                        help="instead: one optimizer step of ours (FSDP2) and of the Trainer's DDP under torch.profiler")
    args = parser.parse_args(argv)
    if args.profile:
        return profile(args)
    models = ["tiny"] if args.smoke else args.models.split(",")
    result = None
    for model in models:  # one section (and one plot) per model: one command each in run_all.py
        result = compare(args, model)
    return result


def compare(args, model: str) -> dict:
    s = SMOKE if args.smoke else SETTINGS[model]
    print(f"train_compare: {model} {s}, {1 if args.smoke else args.rounds} round(s)", flush=True)
    if args.smoke:  # one process each, in this process: checks the routes run, measures nothing
        rounds = [{"ours": run_ours(model, s, nproc=0), "trainer": run_peer("trainer", model, s, inprocess=True),
                   "plain": run_peer("plain", model, s, inprocess=True)}]
    else:  # every route once per round, rounds one after the other: slow spells of the host hit every route
        routes = {"ours": lambda: run_ours(model, s), "trainer": lambda: run_peer("trainer", model, s),
                  "plain": lambda: run_peer("plain", model, s, False, 1)}
        for i, (name, env, overrides) in enumerate(VARIANTS[model]):
            routes[name] = lambda env=env, overrides=overrides, i=i: run_ours(model, s, 2, env, overrides, f"_v{i}")
        rounds = []
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", flush=True)
            rounds.append({route: run() for route, run in routes.items()})
    rows, ratios = [], []
    for route in rounds[0]:
        runs = [rnd[route] for rnd in rounds]
        tps = [r["tokens_per_s"] for r in runs]
        rows.append({"model": model, "route": route, "parallelism": runs[0]["parallelism"],
                     "tokens/s (median)": median(tps), "min-max": f"{min(tps):,.1f}-{max(tps):,.1f}",
                     "supervised tokens/s (median)": median([r["supervised_tokens_per_s"] for r in runs]),
                     "steps timed": sum(r["steps_timed"] for r in runs),
                     "peak RSS per process (MiB, highest round)": " / ".join(
                         f"{max(r['peak_memory_bytes_per_rank'][k] for r in runs) / 2**20:.0f}"
                         for k in range(len(runs[0]["peak_memory_bytes_per_rank"])))})

    def per_round(a: str, b: str, key: str = "tokens_per_s") -> tuple[float, str]:
        """Median of the per-round ratios a/b (each round's pair ran minutes apart), and their min-max."""
        return C.round_ratios([rnd[a][key] for rnd in rounds], [rnd[b][key] for rnd in rounds])

    value, spread = per_round("ours", "trainer")
    ratios.append(C.ratio(f"{model}: ours / Trainer tokens/s", value, ">= 1.0x", None if args.smoke else value >= 1.0,
                          f"median of per-round ratios; {spread}"))
    value, spread = per_round("ours", "trainer", "supervised_tokens_per_s")
    ratios.append(C.ratio(f"{model}: ours / Trainer supervised tokens/s", value, None, None,
                          f"same batches up to shuffle order; {spread}"))
    value, spread = per_round("ours", "plain")
    ratios.append(C.ratio(f"{model}: ours / plain 1-process loop tokens/s", value, None, None, spread))
    for name, _, _ in ([] if args.smoke else VARIANTS[model]):
        value, spread = per_round(name, "trainer")
        ratios.append(C.ratio(f"{model}: {name} / Trainer tokens/s", value, None, None, spread))
        value, spread = per_round("ours", name)
        ratios.append(C.ratio(f"{model}: ours / {name} tokens/s", value, None, None, spread))
    return save(args, model, s, rounds, rows, ratios)


PROFILE_ROUTES = {"tiny": ("fsdp", "fsdp-noreshard", "fsdp-once", "ddp"), "smollm2": ("fsdp", "fsdp-once", "ddp")}
PROFILE = {"tiny": dict(seq=128, micro=4, accum=2, steps=3, lr=3e-3), "smollm2": dict(seq=128, micro=1, accum=2, steps=2, lr=2e-5)}


def profile(args):
    """Where a step's time goes, ours against the Trainer's wrapping: _peer_worker.py --route profile-fsdp / -ddp
    under torchrun (2 ranks, 1 thread each), the same micro-batches, rank 0's profile of the last step."""
    models = ["tiny"] if args.smoke else args.models.split(",")
    rows, ratios, notes = [], [], []
    for model in models:
        s = dict(PROFILE[model], steps=2) if args.smoke else PROFILE[model]
        walls = {}
        impls = ("fsdp", "ddp") if args.smoke else PROFILE_ROUTES[model]
        for impl in impls:
            out = C.RUNS / f"train_profile_{model}_{impl}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            args_ = ["--route", f"profile-{impl}", "--model-dir", C.model_dir(model), "--out", out, "--steps", s["steps"],
                     "--micro", s["micro"], "--accum", s["accum"], "--seq", s["seq"], "--lr", s["lr"]]
            C.run_cmd(C.torchrun(2, None, args_, malloc_env=False, script=C.BENCH / "_peer_worker.py"), threads=1)
            r = json.loads(out.read_text())
            folder = C.RESULTS_DIR / ("smoke" if args.smoke else "")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"train_profile_{model}_{impl}.txt").write_text(f"one profiled step, rank 0: {r['wall_s']:.3f} s\n{r['table']}")
            walls[impl] = r["wall_s"]
            route = {"fsdp": "ours: FSDP2 (build_sharded_model, token_loss_sum)",
                     "fsdp-noreshard": "ours with fsdp.reshard_after_forward=false",
                     "fsdp-once": "ours with fsdp.gather_once_per_step=true (smollm2_full.yaml's setting)",
                     "ddp": "Trainer's wrapping: DDP, model(**batch).loss"}[impl]
            rows.append({"model": model, "route": route, "profiled step (s)": r["wall_s"],
                         "matmul + attention share": r["shares"]["matmul + attention kernels"],
                         "collectives share (incl. waits)": r["shares"]["collectives (incl. waits)"],
                         "optimizer step (s)": r["optimizer_s"], "collective ops": r["collective_calls"]})
            notes.append(f"{model}, {impl}: top ops by self CPU time: " + "; ".join(
                f"`{t['op']}` {100 * t['share']:.1f}% ({t['calls']} calls)" for t in r["top"][:6]) +
                f". Full table: results/train_profile_{model}_{impl}.txt.")
        ratios.append(C.ratio(f"{model}: profiled step time ours (FSDP2) / DDP", walls["fsdp"] / walls["ddp"], None, None,
                              "lower is faster; one step each"))
        if "fsdp-once" in walls:
            ratios.append(C.ratio(f"{model}: profiled step time ours with gather_once_per_step=true / DDP",
                                  walls["fsdp-once"] / walls["ddp"], None, None, "parameters gathered once per step"))
        if "fsdp-noreshard" in walls:
            ratios.append(C.ratio(f"{model}: profiled step time ours with reshard_after_forward=False / DDP",
                                  walls["fsdp-noreshard"] / walls["ddp"], None, None, "half the all-gathers, full parameters in backward"))
    notes.insert(0, "Settings: " + "; ".join(f"{m}: seq={PROFILE[m]['seq']}, micro={PROFILE[m]['micro']}, accum={PROFILE[m]['accum']}, "
                                            f"profiled step {PROFILE[m]['steps']} (after {PROFILE[m]['steps'] - 1} warm-up)" for m in models)
                 + ". Every route under the launcher's mimalloc (the same allocator for ours and DDP, so the ops compare)"
                 ". Self CPU time on rank 0 (both ranks do the same work); collectives = gloo all-gather, reduce-scatter, "
                 "all-reduce and broadcast ops and the waits on them, FSDP's own record_function labels included; collective ops = "
                 "the c10d collectives issued (one per collective, as recipes_core.profiling.count_collectives counts them; "
                 "before 2026-12 this column counted every matching profiler event, 4-5 per collective).")
    return C.save_result("train_profile", "1b. Where a training step's time goes: ours (FSDP2) vs the Trainer's DDP (profiled)",
                         C.command_line(), {}, rows, ratios, notes, args.smoke)


def save(args, model, s, rounds, rows, ratios):
    plot = C.bar_plot(C.plot_path(f"train_compare_{model}", args.smoke), f"Training tokens/s, {model} (median of {len(rounds)} round(s))",
                      [model], {route: [median([rnd[route]["tokens_per_s"] for rnd in rounds])] for route in rounds[0]},
                      "tokens / s")
    settings = {model: ("smoke " if args.smoke else "") + ", ".join(f"{k}={v}" for k, v in s.items()),
                "global batch": "micro x accum x 2 ranks (plain loop: micro x 2*accum)",
                "optimizer": "AdamW fused=True in all routes (the recipe's; the Trainer's default adamw_torch_fused)"}
    notes = [
        "Our recipe is `recipes_core.finetune` itself on the model's own cookbook recipe (tiny_full.yaml, "
        "smollm2_full.yaml: its fsdp section, e.g. SmolLM2's gather_once_per_step), with the peers' data, shape and "
        "schedule as overrides, launched with `recipes_core.launch.launch_command` as users of the notebooks do (FSDP2 "
        "`fully_shard` per decoder layer, gloo, the launcher's mimalloc: the parallelism column names the allocator "
        "the ranks recorded); its step time and tokens come from its own metrics.jsonl.",
        "Rounds: every route runs once per round, the rounds one after the other (A B C A B C ...), so a slow spell of "
        "the host falls on every route; a ratio is the median of the per-round ratios, with their min and max.",
        "The Trainer under torchrun on CPU uses **DistributedDataParallel over gloo** (the parallelism column is "
        "read from `trainer.model_wrapped` in the run), with its default `ddp_find_unused_parameters=True`, i.e. what a "
        "user gets without extra flags, and glibc's malloc defaults. It is timed from `on_step_begin` to `on_step_end`, "
        "which leaves out its batch fetch and token count (our timer includes our token-count all-reduces): a small "
        "bias in the Trainer's favour.",
        "Peak RSS per process is `ru_maxrss` of each process, the same method for every route; it includes the "
        "~450 MiB of imported libraries.",
        "DDP keeps full parameters, gradients and AdamW states on every rank and sends one bucketed all-reduce per "
        "step, overlapped with backward; FSDP keeps 1/N of each but all-gathers each layer in forward and backward and "
        "reduce-scatters gradients: on 2 CPU ranks with 1 thread each, gloo collectives are copies through shared "
        "memory, and each one waits until both ranks are on a core (section 1b counts them).",
        "`ours, glibc (MALLOC_MMAP_THRESHOLD_)` is the same recipe with RECIPES_ALLOCATOR=glibc: glibc with the 128 KiB "
        "mmap threshold, the launchers' setting before mimalloc, where every block above the threshold is a fresh "
        "mapping whose pages are faulted in and zeroed each time. `ours, before` (SmolLM2) is also without "
        "gather_once_per_step: the recipe as it stood before both changes.",
        "The plain loop is one process with 1 thread (the other core idle).",
    ]
    return C.save_result(f"train_compare_{model}", f"1. Training throughput, {model}: FSDP2 recipe vs HF Trainer vs plain loop",
                         C.command_line(), settings, rows, ratios, notes, args.smoke, plot)


if __name__ == "__main__":
    main()
