"""Training throughput on one CUDA GPU: our recipe against the Hugging Face Trainer, with MFU.

    python benchmarks/cuda_train_compare.py [--shapes smollm2 llama1b] [--seq 1024] [--micro 16] [--steps 12]

Run on a GPU machine (CI and the 2-core development machine have none; `--smoke` runs the tiniest
setting on CPU in fp32 so the script itself stays tested). Per model shape, in one run:
  ours     recipes_core.finetune under torchrun, one rank, nccl, FSDP2 fully_shard with bf16 compute
           and fp32 reduction (MixedPrecisionPolicy), fused AdamW
  trainer  transformers.Trainer, one process, bf16=True (autocast over fp32 weights), optim
           adamw_torch_fused: the same model folder, tokenized and packed examples, sequence length,
           batch, lr schedule family, betas and clipping
and a bf16 matmul peak measured in the same run. The models are random-init in the shapes of
SmolLM2-135M and Llama-3.2-1B (throughput does not depend on the weight values; no hub download) with
the tiny tokenizer, whose ids are valid in any vocabulary. MFU = training FLOPs per token (6 x
matmul parameters + attention, recipes_core.metrics.flops_per_token) x tokens/s / peak.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import common as C  # noqa: E402

SHAPES = {  # Llama-architecture shapes of public checkpoints (config.json values)
    "tiny": dict(vocab_size=946, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
}


def build_shape(name: str, root: Path) -> Path:
    """A random-init LlamaForCausalLM folder of this shape, with the tiny instruct tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes_core.models import ensure_tiny
    from recipes_core.tokens import load_tokenizer

    tokenizer = load_tokenizer(ensure_tiny(C.TINY_CACHE)["instruct"])
    config = LlamaConfig(**SHAPES[name], max_position_embeddings=8192, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = root / name
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def flops_per_token(folder: Path, seq: int) -> tuple[float, int]:
    """Training FLOPs per token of this folder's model, and its parameter count (tied weights once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from recipes_core.metrics import flops_per_token as per_token
    from recipes_core.models import load_model_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    n_params = sum(p.numel() for p in model.parameters())
    return per_token(load_model_config(folder), n_params, n_params, seq), n_params


def run_ours(folder: Path, out: Path, args) -> dict:
    extra = ["model.source=hf", f"model.path={folder}", "data.packing=true", f"data.max_seq_len={args.seq}",
             f"data.max_train_examples={args.examples}", f"train.micro_batch_size={args.micro}",
             "train.grad_accum_steps=1", "train.lr=1e-4", "train.warmup_steps=0",
             f"log.profile_steps={args.profile_steps}"]
    if args.smoke:  # in this process: the smoke test cannot afford a torchrun start-up
        start, records = C.finetune_inprocess(out, args.steps, extra)
    else:
        C.run_cmd(C.torchrun(1, "recipes_core.finetune", C.finetune_overrides(out, args.steps, extra)), args.threads)
        start, records = C.read_finetune_metrics(out)
    result = C.steady_throughput(records, skip=args.skip)
    kept = records[args.skip:]
    result.update(precision=start["precision"], peak_memory_gib=max(r["peak_memory_bytes_per_rank"][0] for r in kept) / 2**30)
    return result


def run_trainer_worker(argv: list[str]) -> None:
    """--worker trainer: the Trainer route (benchmarks/_peer_worker.py, shared with train_compare) in its
    own process, for its own CUDA memory statistics; 1e-4 lr, no accumulation, packed batches."""
    from transformers import TrainerCallback

    from benchmarks._peer_worker import train_with_trainer

    p = argparse.ArgumentParser()
    for name in ("--model-dir", "--out"):
        p.add_argument(name, required=True)
    for name in ("--steps", "--micro", "--seq", "--examples", "--profile-steps"):
        p.add_argument(name, type=int, default=0)
    args = p.parse_args(argv)
    args.packing = True
    cuda = torch.cuda.is_available()
    callbacks = []
    if args.profile_steps:  # the recipe's StepProfiler, stepped by a callback: the same steps recorded
        from recipes_core.profiling import StepProfiler

        profiler = StepProfiler(args.profile_steps, Path(args.out).parent / "trainer_profile", 0,
                                torch.device("cuda" if cuda else "cpu"))

        class ProfilerStep(TrainerCallback):
            def on_step_end(self, *a, **k):
                profiler.step()

        callbacks.append(ProfilerStep())
    _, times, counts = train_with_trainer(args, accum=1, lr=1e-4, callbacks=callbacks)
    peak = torch.cuda.max_memory_allocated() if cuda else C.max_rss_bytes()
    rows = [{"kind": "train", "step": i + 1, "step_time_s": t, "tokens": counts[i][0],
             "supervised_tokens": counts[i][1]} for i, t in enumerate(times)]
    Path(args.out).write_text("\n".join(json.dumps(r) for r in rows + [{"kind": "summary", "peak": peak}]) + "\n")


def run_trainer(folder: Path, out: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "trainer", "--model-dir", str(folder),
           "--out", str(out), "--steps", str(args.steps), "--micro", str(args.micro), "--seq", str(args.seq),
           "--examples", str(args.examples), "--profile-steps", str(args.profile_steps)]
    if args.smoke:
        run_trainer_worker(cmd[4:])
    else:
        C.run_cmd(cmd, args.threads)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    result = C.steady_throughput([r for r in records if r["kind"] == "train"], skip=args.skip)
    result.update(precision="bf16 autocast" if torch.cuda.is_available() else "fp32",
                  peak_memory_gib=records[-1]["peak"] / 2**30)
    return result


def plot(rows: list[dict], smoke: bool) -> str:
    """tokens/s of each route relative to the Trainer's, per model shape (1.0 = the Trainer)."""
    shapes = list(dict.fromkeys(r["model shape"] for r in rows))
    speed = {(r["model shape"], r["route"]): r["tokens/s"] for r in rows}
    series = {route: [speed[shape, route] / speed[shape, "trainer"] for shape in shapes] for route in ("ours", "trainer")}
    return C.bar_plot(C.plot_path("cuda_train_compare", smoke), "One GPU, bf16: tokens/s relative to the Trainer",
                      shapes, series, "tokens/s / Trainer's", target_line=1.0)


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--worker", "trainer"]:
        return run_trainer_worker(argv[2:])
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "llama1b"], choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="record this many steps of both routes with torch.profiler into --profile-dir "
                             "(a profile run writes no results: the profiler slows the steps it records)")
    parser.add_argument("--profile-dir", default="runs/bench/cuda_profile")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke:
        args.shapes, args.seq, args.micro, args.steps, args.skip, args.examples = ["tiny"], 64, 2, 3, 1, 64
    elif not cuda:
        sys.exit("benchmarks/cuda_train_compare.py needs a CUDA GPU (use --smoke to check the script on CPU)")
    args.threads = 8 if cuda else C.TOTAL_THREADS
    device = torch.device("cuda" if cuda else "cpu")
    from recipes_core.metrics import matmul_peak_flops

    dtype = torch.bfloat16 if cuda else torch.float32
    measured_peak = matmul_peak_flops(device, dtype, size=8192 if cuda else 512, seconds=2.0 if cuda else 0.2)
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for shape in args.shapes:
            folder = build_shape(shape, tmp / "models")
            fpt, n_params = flops_per_token(folder, args.seq)
            results = {"ours": run_ours(folder, tmp / f"{shape}_ours", args),
                       "trainer": run_trainer(folder, tmp / f"{shape}_trainer.jsonl", args)}
            for route, r in results.items():
                rows.append({"model shape": shape, "params": n_params, "route": route, "precision": r["precision"],
                             "tokens/s": r["tokens_per_s"], "MFU (measured peak)": fpt * r["tokens_per_s"] / measured_peak,
                             "steps timed": r["steps_timed"], "peak memory (GiB)": r["peak_memory_gib"]})
            if args.profile_steps:  # keep the operator tables (the traces are large; they stay in tmp)
                keep = Path(args.profile_dir)
                keep.mkdir(parents=True, exist_ok=True)
                for route, folder in (("ours", tmp / f"{shape}_ours" / "profile"), ("trainer", tmp / "trainer_profile" / "profile")):
                    shutil.copy(folder / "rank0_ops.txt", keep / f"{shape}_{route}_ops.txt")
                shutil.rmtree(tmp / "trainer_profile")
            ours, trainer = results["ours"], results["trainer"]
            speed = ours["tokens_per_s"] / trainer["tokens_per_s"]
            ratios.append(C.ratio(f"{shape}: ours / Trainer tokens/s (1 GPU)", speed, ">= 1.0x", speed >= 1.0))
            ratios.append(C.ratio(f"{shape}: ours MFU against the measured bf16 matmul peak",
                                  fpt * ours["tokens_per_s"] / measured_peak))
            ratios.append(C.ratio(f"{shape}: ours / Trainer peak memory", ours["peak_memory_gib"] / trainer["peak_memory_gib"]))
            print(json.dumps(rows[-2:], default=str), flush=True)
    settings = {"GPU": gpu, "seq": args.seq, "micro batch (packed blocks)": args.micro, "steps": args.steps,
                "skip": args.skip, "measured matmul peak (TFLOP/s)": round(measured_peak / 1e12, 1)}
    notes = ["Ours is the unchanged recipe; its step time and tokens come from its own metrics.jsonl. The Trainer is "
             "timed from on_step_begin to on_step_end with a CUDA synchronize at each end.",
             "Both routes see the same packed blocks (4-D block-diagonal masks through SDPA), so the attention "
             "kernel is the same; peak memory is torch.cuda.max_memory_allocated of each process."]
    if args.profile_steps:  # the profiler slows the steps it records: such a run is not a result
        print(f"profile run: operator tables in {args.profile_dir}; results/cuda_train_compare.json left alone")
        return
    name = "cuda_train_compare"
    result = C.save_result(name, "7. On a GPU: FSDP2 recipe (bf16) vs HF Trainer (bf16) on one GPU",
                           C.command_line(), settings, rows, ratios, notes, args.smoke, plot(rows, args.smoke))
    if cuda:  # common.machine() describes the CPU machine; name the GPU and its torch build
        result["machine"] = C.machine().replace("no GPU", f"1x {gpu}")
        result["versions"]["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
        path = (C.RESULTS_DIR / ("smoke" if args.smoke else "")) / f"{name}.json"
        path.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
