"""Benchmark 2: supervised tokens/s with packing against padding, same recipe, same data.

    .venv/bin/python benchmarks/packing.py [--model tiny] [--smoke]

Both runs are `torchrun --nproc_per_node 2 -m recipes_core.finetune` (FSDP2, 1 thread per rank) on the
Alpaca-shaped cookbook data with the same data.max_seq_len, micro-batch size (rows per forward) and
accumulation; the only change is `data.packing=true` (examples laid end to end in blocks of max_seq_len
tokens with a block-diagonal causal mask) against dynamic padding to the longest example of each batch.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402

SETTINGS = dict(seq=256, micro=4, accum=1, steps=10, skip=2, lr=3e-3)
SMOKE = dict(seq=128, micro=2, accum=1, steps=2, skip=1, lr=3e-3, examples=32)


def length_stats(model: str, seq: int) -> dict:
    """Token lengths of the training examples (the distribution packing works on)."""
    from recipes_core.config import load_config
    from recipes_core.finetune import tokenized
    from recipes_core.tokens import load_tokenizer

    cfg = load_config("cookbook/tiny_full.yaml", [f"data.max_seq_len={seq}"])
    examples = tokenized(cfg.data.train_path, cfg, load_tokenizer(C.model_dir(model)), 0)
    lengths = sorted(len(e["input_ids"]) for e in examples)
    supervised = [sum(1 for label in e["labels"][1:] if label != -100) for e in examples]
    q = lambda f: lengths[min(len(lengths) - 1, int(f * len(lengths)))]
    return {"examples": len(lengths), "mean": round(statistics.mean(lengths), 1), "p10": q(0.1), "p50": q(0.5),
            "p90": q(0.9), "max": lengths[-1], "supervised per example (mean)": round(statistics.mean(supervised), 1)}


def main(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args(argv)
    s = SMOKE if args.smoke else SETTINGS
    model = "tiny" if args.smoke else args.model
    stats = length_stats(model, s["seq"])
    rows, results = [], {}
    for packing in (False, True):
        name = "packing" if packing else "padding"
        out = C.RUNS / f"packing_{model}_{name}"
        extra = ["model.source=hf", f"model.path={C.model_dir(model)}", f"data.max_seq_len={s['seq']}",
                 f"data.packing={str(packing).lower()}", f"train.micro_batch_size={s['micro']}",
                 f"train.grad_accum_steps={s['accum']}", f"train.lr={s['lr']}", "train.warmup_steps=0",
                 f"data.max_train_examples={s.get('examples', 0)}"]
        if args.smoke:
            _, steps = C.finetune_inprocess(out, s["steps"], extra)
        else:
            C.run_cmd(C.torchrun(2, "recipes_core.finetune", C.finetune_overrides(out, s["steps"], extra)), threads=1)
            _, steps = C.read_finetune_metrics(out)
        r = C.steady_throughput(steps, s["skip"])
        kept = steps[s["skip"]:] or steps[-1:]
        r["fill"] = sum(x["supervised_tokens"] for x in kept) / sum(x["tokens"] for x in kept)
        results[name] = r
        rows.append({"batching": name, "tokens/s": r["tokens_per_s"], "supervised tokens/s": r["supervised_tokens_per_s"],
                     "supervised share of tokens": r["fill"], "tokens per step": sum(x["tokens"] for x in kept) / len(kept),
                     "step time (s)": r["seconds"] / r["steps_timed"]})
    gain = results["packing"]["supervised_tokens_per_s"] / results["padding"]["supervised_tokens_per_s"]
    ratios = [C.ratio(f"{model}: packing / padding supervised tokens/s", gain, ">= 1.5x", gain >= 1.5),
              C.ratio(f"{model}: packing / padding tokens/s", results["packing"]["tokens_per_s"] /
                      results["padding"]["tokens_per_s"])]
    plot = C.bar_plot(C.plot_path("packing", args.smoke), f"Packing vs padding, {model}, 2 FSDP ranks (same run)",
                      ["tokens/s", "supervised tokens/s"],
                      {n: [results[n]["tokens_per_s"], results[n]["supervised_tokens_per_s"]] for n in ("padding", "packing")},
                      "tokens / s")
    notes = [f"Token lengths of the {stats['examples']} training examples ({model} tokenizer): mean {stats['mean']}, "
             f"p10 {stats['p10']}, p50 {stats['p50']}, p90 {stats['p90']}, max {stats['max']}; supervised tokens per "
             f"example {stats['supervised per example (mean)']} (the Alpaca shape: long prompt template, short answer).",
             "Same rows per forward (micro-batch) in both runs: a packed row of max_seq_len tokens holds several "
             "examples, so each forward does more useful work; padding pads each batch to its longest example.",
             "Packing costs one 4-D (batch, 1, T, T) boolean mask per batch, which sends attention to the masked SDPA "
             "path; it is a small share of the step at these lengths."]
    return C.save_result("packing", "2. Packing vs padding", C.command_line(),
                         {k: v for k, v in s.items()} | {"model": model, "ranks": 2}, rows, ratios, notes, args.smoke, plot)


if __name__ == "__main__":
    main()
