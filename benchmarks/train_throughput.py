"""Training throughput of the FSDP recipe: tokens/s (all and supervised) and model FLOPs utilisation.

    .venv/bin/python benchmarks/train_throughput.py [--models tiny smollm2] [--nproc 2] [--steps 6]

Each model runs `recipes_core.finetune` under torchrun on --nproc CPU ranks (or GPUs where there are
some) with packed blocks of --seq tokens, no eval and no checkpoint. The first step (warm-up: allocation,
first all-gathers) is left out. MFU is the recipe's own figure: PaLM's model FLOPs per token x tokens/s,
against the peak the run measured (a matmul benchmark per rank on CPU, the data sheet on known GPUs).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402


def measure(model: str, nproc: int, steps: int, seq: int, micro: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / model
        extra = ["model.source=hf", f"model.path={C.model_dir(model)}", "data.format=chat",
                 "data.train_path=cookbook/data/chat_train.jsonl", "data.packing=true", f"data.max_seq_len={seq}",
                 f"data.max_train_examples={max(64, 8 * steps * micro * nproc)}", f"train.micro_batch_size={micro}",
                 "train.grad_accum_steps=1", "train.lr=1e-4", "train.warmup_steps=0"]
        C.run_cmd(C.torchrun(nproc, "recipes_core.finetune", C.finetune_overrides(out, steps, extra)), threads)
        start, records = C.read_finetune_metrics(out)
    kept = records[1:] or records
    result = C.steady_throughput(records, skip=1)
    result.update(model=model, nproc=nproc, seq=seq, n_params=start["n_params"], device=start["peak_flops_source"],
                  mfu=sum(r["mfu"] for r in kept) / len(kept),
                  peak_memory_gib=max(max(r["peak_memory_bytes_per_rank"]) for r in kept) / 2**30)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=2)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.steps, args.seq = ["tiny"], 3, 128
    threads = 1  # one thread per rank: nproc ranks share the machine's cores
    print(f"{'model':<9}{'ranks':>6}{'params':>14}{'tokens/s':>11}{'supervised/s':>14}{'MFU':>8}{'peak mem':>11}")
    for model in args.models:
        r = measure(model, args.nproc, args.steps, args.seq, args.micro, threads)
        print(f"{r['model']:<9}{r['nproc']:>6}{r['n_params']:>14,}{r['tokens_per_s']:>11.0f}"
              f"{r['supervised_tokens_per_s']:>14.1f}{r['mfu']:>8.1%}{r['peak_memory_gib']:>9.2f} GiB"
              f"   (peak: {r['device']})")


if __name__ == "__main__":
    main()
