"""Run every benchmark, one after the other, and rebuild benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run_all.py [--smoke] [--only train_compare,packing,...]   (make bench)

Every entry of SCRIPTS is one command (a script and its arguments) that runs in under 5 minutes here; the
seconds each took are printed and kept in results/run_all_timings.json.

Each benchmark runs in its own process (its own thread settings, no state shared between them). The
conversion benchmark is the conversion engineer's benchmarks/convert_memory.py; its output is
recorded as section 4 (parsed when it prints `metric: ratio` lines, otherwise kept as text).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402

# name: (script, its arguments). Each entry is one command of its own, under 5 minutes on this machine.
SCRIPTS = {"train_compare_tiny": ("train_compare", ["--models", "tiny"]),
           "train_compare_smollm2": ("train_compare", ["--models", "smollm2"]), "train_profile": ("train_compare", ["--profile"]),
           "packing": ("packing", []), "mfu": ("mfu", []), "convert": ("convert_memory", []),
           "inference": ("inference", []), "memory_scaling": ("memory_scaling", []),
           "memory_scaling_glibc_default": ("memory_scaling", ["--glibc-default"])}
SMOKE_SKIP = {"memory_scaling_glibc_default", "train_compare_smollm2"}  # --smoke runs the same as another entry
GPU_ONLY = {"cuda_train_compare": ("cuda_train_compare", [])}  # added where torch sees a GPU


def run_convert(smoke: bool) -> None:
    """benchmarks/convert_memory.py belongs to the conversion engineer: run it and record what it says,
    unless it already wrote results/convert.json itself (through benchmarks.common.save_result)."""
    script = C.BENCH / "convert_memory.py"
    if not script.exists():
        print("convert: benchmarks/convert_memory.py does not exist yet; section 4 skipped", flush=True)
        return
    result_file = (C.RESULTS_DIR / ("smoke" if smoke else "")) / "convert.json"
    before = result_file.stat().st_mtime if result_file.exists() else None
    cmd = [sys.executable, str(script)] + (["--smoke"] if smoke else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=C.ROOT, env=C.offline_env(C.TOTAL_THREADS), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if result_file.exists() and result_file.stat().st_mtime != before and proc.returncode == 0:
        add_issue_targets(result_file, smoke)  # it recorded itself; state the issue's targets as ours / naive
        return
    ratios = []
    for line in proc.stdout.splitlines():  # e.g. "peak memory ours / naive: 0.41x" or JSON rows
        line = line.strip()
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key, value in row.items():
                if "ratio" in key and isinstance(value, (int, float)):
                    ratios.append(C.ratio(key, float(value)))
            continue
        match = re.search(r"^(.*?ratio.*?|.*?/.*?)[:=]\s*([0-9.]+)x?\b", line)
        if match:
            ratios.append(C.ratio(match.group(1).strip(), float(match.group(2))))
    tail = "\n".join(output.strip().splitlines()[-25:])
    notes = [f"exit code {proc.returncode}, {seconds:.0f} s. Output of the script (last lines):\n\n```\n{tail}\n```"]
    C.save_result("convert", "4. Conversion: our converter vs the naive route (benchmarks/convert_memory.py)",
                  " ".join([".venv/bin/python", "benchmarks/convert_memory.py"] + (["--smoke"] if smoke else [])),
                  {}, [], ratios, notes, smoke)


def add_issue_targets(result_file: Path, smoke: bool) -> None:
    """Issue #6's conversion targets, ours / naive: peak memory at most 0.6x, and no slower (<= 1.0x).
    Peak memory is taken above the post-import baseline (both processes import the same libraries)."""
    data = json.loads(result_file.read_text(encoding="utf-8"))
    rows = {r.get("route"): r for r in data.get("rows", [])}
    if not {"ours", "naive"} <= set(rows):
        return
    ours, naive = rows["ours"], rows["naive"]
    mem = ours["above_baseline_mib"] / naive["above_baseline_mib"]
    rss = ours["peak_rss_mib"] / naive["peak_rss_mib"]
    sec = ours["seconds"] / naive["seconds"]
    data["ratios"] = [r for r in data["ratios"] if not r["metric"].startswith("ours / naive")] + [
        C.ratio("ours / naive peak memory above baseline", mem, "<= 0.6x", None if smoke else mem <= 0.6),
        C.ratio("ours / naive peak RSS (imports included)", rss),
        C.ratio("ours / naive seconds", sec, "<= 1.0x (no slower)", None if smoke else sec <= 1.0)]
    result_file.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    if not smoke:
        C.write_results_md()


def main(argv=None):
    import torch

    if torch.cuda.is_available():
        SCRIPTS.update(GPU_ONLY)
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated names: " + ", ".join(SCRIPTS))
    args = parser.parse_args(argv)
    timings = {}
    for name in args.only.split(","):
        if args.smoke and name in SMOKE_SKIP:
            continue
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            if name == "convert":
                run_convert(args.smoke)
            else:
                script, extra = SCRIPTS[name]
                subprocess.run([sys.executable, str(C.BENCH / f"{script}.py"), *extra] + (["--smoke"] if args.smoke else []),
                               cwd=C.ROOT, env=C.offline_env(C.TOTAL_THREADS), check=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            print(f"{name}: FAILED ({err})", flush=True)
        timings[name] = time.perf_counter() - start
    for name, seconds in timings.items():
        print(f"{name:30s} {seconds:6.0f} s{'  (over the 5-minute budget)' if seconds > 300 else ''}")
    (C.RESULTS_DIR / ("smoke" if args.smoke else "")).mkdir(parents=True, exist_ok=True)
    timings_file = C.RESULTS_DIR / ("smoke" if args.smoke else "") / "run_all_timings.json"
    previous = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    timings_file.write_text(json.dumps({**previous, **timings}, indent=1))  # --only updates its entries
    if not args.smoke:
        print(f"wrote {C.write_results_md()}")


if __name__ == "__main__":
    main()
