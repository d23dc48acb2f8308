"""Benchmark 8: host memory per rank while the model loads: sharded loading against rank 0's broadcast.

    .venv/bin/python benchmarks/load_memory.py [--model smollm2] [--ranks 2,4] [--rounds 3] [--smoke]

Each rank (this file under torchrun, 1 thread per rank, the launcher's allocator: mimalloc) loads the model with
the recipe's `recipes_core.finetune.build_sharded_model`:
  sharded    the default: each rank reads only its own rows of the safetensors files into its shards;
  broadcast  from_rank0=True, the way before (and still for folders without safetensors): rank 0 reads the
             whole model with from_pretrained, set_model_state_dict(broadcast_from_rank0=True) sends it.
The two routes alternate, one torchrun launch each, for --rounds rounds.

Method: baseline = RSS after imports and process-group start; peak = highest RSS sampled every 2 ms by a
thread during build_sharded_model, and at its end; load = peak - baseline. The issue's target is on the
peak RSS (rank 0 / the largest other rank <= 1.3x); the load alone is the part that grows with the model
(for a 70B model the ~450 MiB of libraries in the baseline are nothing), so its ratio is given too.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402

ROUTES = ("broadcast", "sharded")
TARGET = 1.3  # rank 0's peak RSS while loading / the other ranks' (issue 13)


def worker(hf_dir: str, route: str) -> dict:
    import torch.distributed as dist

    from recipes_core import distributed as D
    from recipes_core.config import load_config
    from recipes_core.finetune import build_sharded_model
    from recipes_core.models import load_model_config

    with D.process_group("gloo") as env:
        cfg = load_config("cookbook/tiny_full.yaml", ["model.source=hf", f"model.path={hf_dir}"])
        model_config = load_model_config(hf_dir)
        gc.collect()
        baseline = C.rss_bytes()
        sampler = C.RssSampler()
        model = build_sharded_model(cfg, env, hf_dir, model_config, from_rank0=route == "broadcast")[0]
        peak = sampler.stop()
        shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        result = {"rank": env.rank, "world_size": env.world_size, "baseline": baseline, "peak": peak,
                  "after": C.rss_bytes(), "shard_bytes": shard_bytes}
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, result)
        return {"route": route, "ranks": gathered}


def ratios_of(data: dict) -> tuple[float, float]:
    """(rank 0's peak / the largest other rank's, the same for the load alone = peak - baseline)."""
    ranks = data["ranks"]
    others = ranks[1:] or ranks
    peak = ranks[0]["peak"] / max(r["peak"] for r in others)
    load = (ranks[0]["peak"] - ranks[0]["baseline"]) / max(r["peak"] - r["baseline"] for r in others)
    return peak, load


def main(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=3, metavar=("HF_DIR", "ROUTE", "OUT"), help="internal: a torchrun rank")
    args = parser.parse_args(argv)
    if args.worker:
        hf_dir, route, out = args.worker
        data = worker(hf_dir, route)
        if int(os.environ.get("RANK", 0)) == 0:
            Path(out).write_text(json.dumps(data))
        return None
    model = "tiny" if args.smoke else args.model
    hf_dir = str(C.model_dir(model))
    ranks = [1] if args.smoke else [int(x) for x in args.ranks.split(",")]
    rounds = 1 if args.smoke else args.rounds
    runs = {}  # (ranks, route) -> [data per round]
    for n in ranks:
        for i in range(rounds):
            for route in ROUTES:
                if args.smoke:  # one process, no torchrun: checks the script against the library
                    data = worker(hf_dir, route)
                else:
                    out = C.RUNS / f"load_memory_{model}_{n}_{route}_{i}.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    C.run_cmd(C.torchrun(n, None, ["--worker", hf_dir, route, out], script=Path(__file__)), threads=1)
                    data = json.loads(out.read_text())
                runs.setdefault((n, route), []).append(data)
    rows, ratios, medians = [], [], {}
    for (n, route), datas in runs.items():
        for i, data in enumerate(datas):
            for r in data["ranks"]:
                rows.append({"ranks": n, "route": route, "round": i, "rank": r["rank"],
                             "baseline RSS (MiB)": r["baseline"] / 2**20, "peak RSS (MiB)": r["peak"] / 2**20,
                             "load = peak - baseline (MiB)": (r["peak"] - r["baseline"]) / 2**20,
                             "RSS after (MiB)": r["after"] / 2**20, "own shards (MiB)": r["shard_bytes"] / 2**20})
        peak, load = zip(*(ratios_of(d) for d in datas))
        medians[(n, route)] = statistics.median(peak)
        spread = f"median of {len(peak)} rounds, min-max {min(peak):.3f}-{max(peak):.3f}"
        ratios.append(C.ratio(f"{model}, {n} ranks, {route}: rank 0 / other ranks, peak RSS while loading",
                              statistics.median(peak), f"<= {TARGET}x" if route == "sharded" else None,
                              statistics.median(peak) <= TARGET if route == "sharded" else None, spread))
        ratios.append(C.ratio(f"{model}, {n} ranks, {route}: rank 0 / other ranks, load alone (peak - baseline)",
                              statistics.median(load), None, None,
                              f"median of {len(load)} rounds, min-max {min(load):.3f}-{max(load):.3f}"))
    plot = C.bar_plot(C.plot_path("load_memory", args.smoke), f"Peak RSS while loading {model}, rank 0 / other ranks",
                      [f"{n} rank(s)" for n in ranks], {route: [medians[(n, route)] for n in ranks] for route in ROUTES},
                      "ratio (median over rounds)", target_line=TARGET)
    notes = [
        "Method: baseline = RSS after imports and process-group start; peak = highest RSS sampled every 2 ms by a "
        "thread during build_sharded_model and at its end; load = peak - baseline. Ratios: rank 0 / the largest "
        "other rank, median over rounds with min-max.",
        "sharded: each rank reads its own rows of the safetensors files (memory-mapped; the pages it touched count "
        "in its RSS until the file is closed). broadcast: rank 0 holds the whole fp32 model from from_pretrained and "
        "its state dict while set_model_state_dict(broadcast_from_rank0=True) sends it.",
        "1 thread per rank; every rank with the launcher's allocator (recipes_core.launch.allocator_env: mimalloc).",
    ]
    return C.save_result("load_memory", "8. Loading: rank 0's memory against the other ranks'", C.command_line(),
                         {"model": model, "ranks": ranks, "rounds": rounds}, rows, ratios, notes, args.smoke, plot)


if __name__ == "__main__":
    main()
