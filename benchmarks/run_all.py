"""Run every benchmark, one after the other, and rebuild benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run_all.py [--smoke] [--only train_compare_tiny,packing,...]   (make bench)

Every entry of SCRIPTS is one command (a script and its arguments) that runs in under 20 minutes here; the
seconds each took are printed and kept in results/run_all_timings.json. Each benchmark runs in its own
process (its own thread settings, no state shared between them) and writes its result as data,
results/<name>.json (benchmarks.common.save_result); run_all reads those files, never a script's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402

# name (= the result file it writes): (script, its arguments). Each one a command of under 20 minutes here.
SCRIPTS = {"train_compare_tiny": ("train_compare", ["--models", "tiny"]),
           "train_compare_smollm2": ("train_compare", ["--models", "smollm2"]), "train_profile": ("train_compare", ["--profile"]),
           "packing": ("packing", []), "mfu": ("mfu", []), "convert": ("convert_memory", []),
           "inference": ("inference", []), "memory_scaling": ("memory_scaling", []),
           "memory_scaling_glibc_threshold": ("memory_scaling", ["--glibc-threshold"]),
           "memory_scaling_glibc_default": ("memory_scaling", ["--glibc-default"]),
           "load_memory": ("load_memory", []),
           "compile_speed_tiny": ("compile_speed", ["--models", "tiny"]),  # smollm2: compile_speed.py --models smollm2
           "chunked_loss": ("chunked_loss", []), "chunked_loss_ac": ("chunked_loss", ["--activation-checkpointing"])}
SMOKE_SKIP = {"memory_scaling_glibc_default", "memory_scaling_glibc_threshold", "train_compare_smollm2",
              "chunked_loss_ac"}  # --smoke runs the same as another entry
GPU_ONLY = {"cuda_train_compare": ("cuda_train_compare", [])}  # added where torch sees a GPU


def run(name: str, smoke: bool) -> dict:
    """Run one entry in its own process; the result it wrote (results/[smoke/]<name>.json)."""
    script, extra = SCRIPTS[name]
    result_file = C.RESULTS_DIR / ("smoke" if smoke else "") / f"{name}.json"
    before = result_file.stat().st_mtime if result_file.exists() else None
    subprocess.run([sys.executable, str(C.BENCH / f"{script}.py"), *extra] + (["--smoke"] if smoke else []),
                   cwd=C.ROOT, env=C.offline_env(C.TOTAL_THREADS), check=True, timeout=1800)
    if not result_file.exists() or result_file.stat().st_mtime == before:
        raise RuntimeError(f"{script}.py exited 0 but did not write {result_file}")
    return json.loads(result_file.read_text(encoding="utf-8"))


def main(argv=None):
    import torch

    if torch.cuda.is_available():
        SCRIPTS.update(GPU_ONLY)
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated names: " + ", ".join(SCRIPTS))
    args = parser.parse_args(argv)
    timings, missed = {}, []
    for name in args.only.split(","):
        if args.smoke and name in SMOKE_SKIP:
            continue
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = run(name, args.smoke)
            missed += [f"{name}: {r['metric']}: {r['ratio']:.3f}x, target {r['target']}" for r in result["ratios"]
                       if r["met"] is False]
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as err:
            print(f"{name}: FAILED ({err})", flush=True)
        timings[name] = time.perf_counter() - start
    for name, seconds in timings.items():
        print(f"{name:30s} {seconds:6.0f} s{'  (over the 20-minute budget)' if seconds > 1200 else ''}")
    for line in missed:
        print(f"target missed: {line}")
    (C.RESULTS_DIR / ("smoke" if args.smoke else "")).mkdir(parents=True, exist_ok=True)
    timings_file = C.RESULTS_DIR / ("smoke" if args.smoke else "") / "run_all_timings.json"
    previous = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    timings_file.write_text(json.dumps({**previous, **timings}, indent=1))  # --only updates its entries
    if not args.smoke:
        print(f"wrote {C.write_results_md()}")


if __name__ == "__main__":
    main()
