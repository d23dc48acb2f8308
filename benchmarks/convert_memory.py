"""Benchmark 4: peak memory and time of checkpoint -> Hugging Face conversion, ours against the naive route.

    .venv/bin/python benchmarks/convert_memory.py [--rounds 3] [--smoke] [--hidden 1024 --layers 8 --vocab 32768]

Routes, each in its own fresh process (ru_maxrss cannot be reset, so one process per measurement):
  ours   recipes_core.convert.convert: model built on the meta device and materialised once, DCP reads
         only the "model" entries straight into its tensors, save_pretrained writes from those tensors.
  naive  what the older recipes did: gather every shard into one file (dcp_to_torch_save), torch.load
         it, build the model with its own weights, load_state_dict, save_pretrained.
The checkpoint is a single-process DCP save of a randomly initialised Llama of the given shape (no
optimizer state: the naive route would only look worse with it).

Reported per route: peak RSS (ru_maxrss), RSS after imports (baseline), peak - baseline as a multiple of
the model's fp32 bytes, and the conversion's seconds (imports excluded). The routes alternate for --rounds
rounds (ours, naive, ours, naive, ...); each figure is the median over rounds, each ratio the median of the
per-round ratios ours / naive, with min-max.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402

SHAPES = {"full": dict(hidden=1024, layers=8, vocab=32768), "smoke": dict(hidden=128, layers=2, vocab=4096)}


def make_checkpoint(work: Path, hidden: int, layers: int, vocab: int) -> int:
    """Write work/run/step_1 (DCP, model only) and its train_params.yaml; returns the model's bytes."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    import yaml
    from transformers import AutoModelForCausalLM

    from recipes_core.models import ensure_tiny
    from recipes_core.tiny import tiny_llama_config

    tokenizer_dir = ensure_tiny(C.TINY_CACHE)["instruct"]
    config = tiny_llama_config(vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                               num_attention_heads=max(4, hidden // 64), num_key_value_heads=max(2, hidden // 256))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ckpt = work / "run" / "step_1"
    warnings.filterwarnings("ignore", message=".*torch.distributed.*")
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt), no_dist=True)
    params = {"config": {}, "model_source": {"kind": "hf", "path": str(tokenizer_dir), "hf_dir": str(tokenizer_dir)},
              "model_config": config.to_dict(), "tokenizer": str(tokenizer_dir), "step": 1, "save_optimizer": False,
              "lora": None, "world_size": 1, "param_dtype": "fp32"}
    (ckpt / "train_params.yaml").write_text(yaml.safe_dump(params))
    (work / "run" / "latest").write_text("step_1")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def convert_ours(work: Path) -> None:
    from recipes_core.convert import convert

    convert(work / "run", work / "ours", dtype="fp32")


def convert_naive(work: Path) -> None:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig, AutoModelForCausalLM

    from recipes_core.checkpoint import load_train_params
    from recipes_core.tokens import load_tokenizer

    params = load_train_params(work / "run" / "step_1")
    dcp_to_torch_save(str(work / "run" / "step_1"), str(work / "full.pt"))  # every shard into one file
    state = torch.load(work / "full.pt", weights_only=True)["model"]
    config_dict = dict(params["model_config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config_dict.pop("model_type"), **config_dict))
    model.load_state_dict(state)
    model.save_pretrained(work / "naive")
    load_tokenizer(params["tokenizer"]).save_pretrained(work / "naive")


def phase(name: str, work: Path) -> dict:
    """Run one route in this process and measure it (called in a fresh subprocess)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch  # noqa: F401  (imports first: the baseline includes them for both routes)
    import transformers  # noqa: F401

    import recipes_core.convert  # noqa: F401

    baseline = C.rss_bytes()
    start = time.perf_counter()
    {"ours": convert_ours, "naive": convert_naive}[name](work)
    return {"route": name, "seconds": time.perf_counter() - start, "baseline_bytes": baseline,
            "peak_bytes": C.max_rss_bytes()}


def run_phase(name: str, work: Path) -> dict:
    """One route in a fresh process, which writes its measurement to work/<name>.json."""
    C.run_cmd([sys.executable, str(Path(__file__).resolve()), "--phase", name, "--work", str(work)], threads=2)
    return json.loads((work / f"{name}.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phase", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        (Path(args.work) / f"{args.phase}.json").write_text(json.dumps(phase(args.phase, Path(args.work))))
        return {}

    shape = dict(SHAPES["smoke" if args.smoke else "full"])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k)})
    work = C.RUNS / ("convert_smoke" if args.smoke else "convert")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_bytes = make_checkpoint(work, **shape)
    print(f"checkpoint: {shape}, {model_bytes / 2**20:.0f} MiB of fp32 weights", flush=True)
    measured = {"ours": [], "naive": []}
    for i in range(1 if args.smoke else args.rounds):
        for name in measured:
            shutil.rmtree(work / name, ignore_errors=True)
            (work / "full.pt").unlink(missing_ok=True)
            measured[name].append(run_phase(name, work))
            m = measured[name][-1]
            print(f"  round {i + 1}, {name}: {(m['peak_bytes'] - m['baseline_bytes']) / 2**20:.0f} MiB above baseline, "
                  f"{m['seconds']:.2f} s", flush=True)
    med = statistics.median
    above = {name: [m["peak_bytes"] - m["baseline_bytes"] for m in ms] for name, ms in measured.items()}
    rows = [{"route": name, "peak_rss_mib": round(med(m["peak_bytes"] for m in ms) / 2**20, 1),
             "baseline_rss_mib": round(med(m["baseline_bytes"] for m in ms) / 2**20, 1),
             "above_baseline_mib": round(med(above[name]) / 2**20, 1),
             "above_baseline_x_model": round(med(above[name]) / model_bytes, 2),
             "seconds": round(med(m["seconds"] for m in ms), 2)} for name, ms in measured.items()]

    def per_round(values):  # ours / naive, round by round
        return C.round_ratios(values["ours"], values["naive"])

    memory, memory_note = per_round(above)
    rss, rss_note = per_round({k: [m["peak_bytes"] for m in ms] for k, ms in measured.items()})
    seconds, seconds_note = per_round({k: [m["seconds"] for m in ms] for k, ms in measured.items()})
    ratios = [C.ratio("ours / naive peak memory above baseline", memory, "<= 0.6x", None if args.smoke else memory <= 0.6,
                      memory_note),
              C.ratio("ours / naive peak RSS (imports included)", rss, note=rss_note),
              C.ratio("ours / naive seconds", seconds, "<= 1.0x (no slower)", None if args.smoke else seconds <= 1.0,
                      seconds_note)]
    notes = [f"Model: {shape}, {model_bytes / 2**20:.0f} MiB of fp32 weights, DCP checkpoint written by one process.",
             "Baseline = RSS after importing torch, transformers and recipes_core.convert, before converting; "
             "peak = ru_maxrss of the process. Ours stays near one copy of the weights above the baseline (it "
             "allocates the largest tensors and reads them first, so DCP's per-tensor read buffer never sits on "
             "top of the whole model); the naive route holds the gathered state dict and the model at once."]
    return C.save_result("convert", "4. Conversion: our converter vs the naive route (benchmarks/convert_memory.py)",
                         " ".join([".venv/bin/python", "benchmarks/convert_memory.py"] + (["--smoke"] if args.smoke else [])),
                         {**shape, "model_mib": round(model_bytes / 2**20, 1), "rounds": len(above["ours"])}, rows, ratios, notes, args.smoke)


if __name__ == "__main__":
    main()
