"""Benchmark: peak memory of a SmolLM2 training step with the plain loss and with chunked cross-entropy.

    .venv/bin/python benchmarks/chunked_loss.py [--seq 2048] [--repeats 3] [--chunks 256] [--ranks 1,2]
                                                [--activation-checkpointing] [--smoke]

Each measurement is one fresh launch of the recipe's launcher (recipes_core.launch: torchrun, mimalloc) on
1 or 2 ranks, the recipe's model build (FSDP2, `build_sharded_model`; AdamW fused, as recipes_core.finetune).
On 2 ranks the weights, gradients and AdamW states are sharded (half each) while every rank computes its own
micro-batch's logits whole: the loss's share of a rank's memory grows with the ranks. The optimizer states
exist before the measured step (a first step on 8 tokens creates them), so the measured step is a
steady-state one: micro-batch 1 x `--seq` random tokens per rank, all supervised, forward + backward + clip +
AdamW step, with `token_loss_sum(..., chunk_size)`. A launch's figure is its largest rank's.

Figures per process (RSS sampled every 2 ms by a thread, torch 2.13 keeps no CPU allocator statistics):
  step peak above baseline = peak RSS during the step - RSS after imports and process-group start
                             (the ~450 MiB of libraries left out): what the recipe itself holds at its peak;
  step increment           = peak RSS during the step - RSS just before it (weights, gradients' buffers and
                             AdamW states already there): what the step's forward/backward adds.
Settings run interleaved (plain, chunk a, chunk b, plain, ...) so a noisy neighbour hits all of them alike;
the ratio chunked / plain is taken per round, and its median and min-max are reported.
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


def smollm2_dir() -> Path:
    from recipes_core.models import gguf_to_hf

    return gguf_to_hf(os.environ.get("SMOLLM2_GGUF", C.SMOLLM2_GGUF))  # converted once, beside the GGUF


def worker(model: str, seq: int, chunk: int, checkpointing: bool) -> dict:
    import torch

    from recipes_core import distributed as D
    from recipes_core.config import load_config
    from recipes_core.finetune import build_sharded_model, token_loss_sum
    from recipes_core.models import load_model_config

    env = D.setup("gloo")
    try:
        gc.collect()
        baseline = C.rss_bytes()
        hf_dir = str(smollm2_dir() if model == "smollm2" else C.tiny_dir())
        cfg = load_config("cookbook/tiny_full.yaml", ["model.source=hf", f"model.path={hf_dir}",
                                                      f"fsdp.activation_checkpointing={str(checkpointing).lower()}"])
        model_config = load_model_config(hf_dir)
        net = build_sharded_model(cfg, env, hf_dir, model_config)[0]
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)

        def step(ids):
            batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
            token_loss_sum(net, batch, env.device, chunk).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        g = torch.Generator().manual_seed(0)
        step(torch.randint(0, model_config["vocab_size"], (1, 8), generator=g))  # creates the AdamW states
        ids = torch.randint(0, model_config["vocab_size"], (1, seq), generator=g)
        gc.collect()
        before = C.rss_bytes()
        sampler = C.RssSampler()
        start = time.perf_counter()
        step(ids)
        seconds = time.perf_counter() - start
        peak = sampler.stop()
        return {"baseline": baseline, "before_step": before, "peak": peak, "step_s": seconds,
                "above_baseline": peak - baseline, "increment": peak - before,
                "vocab": model_config["vocab_size"], "tied": bool(model_config.get("tie_word_embeddings"))}
    finally:
        D.teardown(env)


def main(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", default="256", help="chunk sizes to compare with the plain loss (0)")
    parser.add_argument("--ranks", default="1,2", help="rank counts to measure each chunk size on")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--worker", nargs=5, metavar=("MODEL", "SEQ", "CHUNK", "AC", "OUT"), help="internal")
    args = parser.parse_args(argv)
    if args.worker:
        model, seq, chunk, ac, out = args.worker
        result = worker(model, int(seq), int(chunk), ac == "1")  # one file per rank: their stdout lines interleave
        Path(f"{out}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))
        return None
    model, seq, repeats = ("tiny", 256, 1) if args.smoke else ("smollm2", args.seq, args.repeats)
    if model == "smollm2":
        smollm2_dir()  # convert once, outside the measured processes

    chunks = [0] + [int(c) for c in args.chunks.split(",")]
    ranks = [int(n) for n in args.ranks.split(",")]
    ac = "1" if args.activation_checkpointing else "0"
    runs = {(n, c): [] for n in ranks for c in chunks}
    for r in range(repeats):
        for n in ranks:
            for c in chunks:
                out = C.RUNS / f"chunked_loss_{model}_{seq}_{n}_{c}_{ac}"
                out.parent.mkdir(parents=True, exist_ok=True)
                for old in out.parent.glob(f"{out.name}.rank*.json"):
                    old.unlink()
                cmd = C.torchrun(n, None, ["--worker", model, str(seq), str(c), ac, out], script=Path(__file__))
                C.run_cmd(cmd, threads=1, timeout=1800)
                per_rank = [json.loads(out.with_name(f"{out.name}.rank{rank}.json").read_text()) for rank in range(n)]
                worst = {k: max(x[k] for x in per_rank) if isinstance(per_rank[0][k], (int, float)) and
                         not isinstance(per_rank[0][k], bool) else per_rank[0][k] for k in per_rank[0]}
                runs[n, c].append(worst)
                print(f"  round {r + 1}, {n} rank(s), chunk {c}: {worst['above_baseline'] / 2**20:.0f} MiB above "
                      f"baseline, largest rank", flush=True)
    from recipes_core import plan as P

    shape = P.resolve_model(str(smollm2_dir() if model == "smollm2" else C.tiny_dir()))[1]
    rows, ratios = [], []
    for n in ranks:
        plain = runs[n, 0]
        for c in chunks:
            predicted = P.plan(shape, n, 1, seq, "fp32", ac == "1", False, c, device="cpu")["device"]  # same settings
            for kind in ("above_baseline", "increment"):
                got = runs[n, c]
                per_round = [x[kind] / p[kind] for x, p in zip(got, plain)]
                row = {"ranks": n, "loss": "plain" if c == 0 else f"chunked, {c} tokens", "figure": kind,
                       "MiB (median)": statistics.median(x[kind] for x in got) / 2**20,
                       "MiB min": min(x[kind] for x in got) / 2**20, "MiB max": max(x[kind] for x in got) / 2**20,
                       "step s (median)": statistics.median(x["step_s"] for x in got),
                       "/ plain (median)": statistics.median(per_round), "/ plain min": min(per_round),
                       "/ plain max": max(per_round),
                       "planner / measured": predicted / statistics.median(x[kind] for x in got)
                       if kind == "above_baseline" else None}
                rows.append(row)
                if c and kind == "above_baseline":
                    ratios.append(C.ratio(
                        f"{model} seq {seq}, {n} rank(s), activation checkpointing {'on' if ac == '1' else 'off'}: "
                        f"chunk {c} / plain, step peak above baseline (median of {repeats}, min {min(per_round):.3f}, "
                        f"max {max(per_round):.3f})", statistics.median(per_round), "at most 0.7x",
                        statistics.median(per_round) <= 0.7))
    for row in rows:
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    notes = [__doc__.split("Figures per process", 1)[1].strip(),
             f"Model {model}, micro-batch 1 x {seq} tokens per rank, fp32, 1 thread per rank, activation checkpointing "
             f"{'on' if ac == '1' else 'off'}, {repeats} interleaved rounds."]
    name = "chunked_loss" + ("_ac" if ac == "1" else "")
    title = f"9. Chunked cross-entropy: peak memory of a step at {seq} tokens, activation checkpointing " + (
        "on" if ac == "1" else "off")
    return C.save_result(name, title, C.command_line(),
                         {"model": model, "seq": seq, "chunks": chunks, "ranks": ranks, "repeats": repeats,
                          "activation_checkpointing": ac == "1"}, rows, ratios, notes, args.smoke)


if __name__ == "__main__":
    main()
