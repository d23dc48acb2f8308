"""Shared pieces of the benchmarks: thread budget, subprocess runs, memory sampling, results and plots.

Every benchmark writes benchmarks/results/<name>.json (its rows, ratios, settings and command), draws
benchmarks/<name>.png, and then regenerates benchmarks/RESULTS.md from all the JSON files, so each
script alone keeps RESULTS.md whole. Figures are ratios measured in one run against a peer doing the
same work: on a shared 2-core machine absolute numbers move with the neighbours, ratios much less.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS_DIR = BENCH / "results"
RUNS = ROOT / "runs" / "bench"
SMOLLM2_GGUF = ROOT / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = ROOT / "runs" / "cache" / "smollm2-135m-instruct-hf"
TINY_CACHE = ROOT / "runs" / "cache" / "tiny"
ALPACA = ROOT / "cookbook" / "data" / "alpaca_train.jsonl"
TOTAL_THREADS = 2  # this machine's cores; every route gets the same budget (1 thread x 2 ranks, or 2 x 1)

# Order of the sections in RESULTS.md.
ORDER = ["train_compare_tiny", "train_compare_smollm2", "train_profile", "packing", "mfu", "mfu_optimizer", "convert", "inference", "memory_scaling",
         "memory_scaling_glibc_threshold", "memory_scaling_glibc_default", "cuda_train_compare", "load_memory", "compile_speed_tiny",
         "compile_speed_smollm2", "chunked_loss", "chunked_loss_ac"]


def offline_env(threads: int) -> dict[str, str]:
    """Environment for a benchmark process: its thread share, no hub, no tokenizer threads."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
                "TRANSFORMERS_VERBOSITY": "error"})
    return env


def run_cmd(cmd: list[str], threads: int, timeout: float = 600, env_extra: dict | None = None) -> str:
    """Run a command from the repo root; its stdout+stderr, or an error with the tail of it."""
    start = time.perf_counter()
    env = offline_env(threads) | (env_extra or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    print(f"  [{time.perf_counter() - start:5.1f}s] {' '.join(str(c) for c in cmd[:8])} ...", flush=True)
    return out


def torchrun(nproc: int, module: str | None, args: list[str], malloc_env: bool = True, script: Path | None = None) -> list[str]:
    """The recipe's own launch command for a module or a script (recipes_core.launch.launch_command, which
    sets the glibc malloc threshold for its ranks); malloc_env=False drops that `env VAR=value` prefix
    (glibc defaults, as the peers' own launchers leave it)."""
    from recipes_core.launch import launch_command

    cmd = launch_command(nproc, module, [str(a) for a in args], script=script)
    if not malloc_env and cmd[0] == "env":
        cmd = cmd[cmd.index(sys.executable):]
    return cmd


# ----- models --------------------------------------------------------------------------------------------

def tiny_dir() -> Path:
    from recipes_core.models import ensure_tiny

    return ensure_tiny(TINY_CACHE)["instruct"]


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted from the GGUF once (cached under runs/)."""
    from recipes_core.models import gguf_to_hf

    return gguf_to_hf(SMOLLM2_GGUF, SMOLLM2_CACHE)


def model_dir(name: str) -> Path:
    return {"tiny": tiny_dir, "smollm2": smollm2_dir}[name]()


# ----- memory --------------------------------------------------------------------------------------------

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size now (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class RssSampler:
    """Samples this process's RSS every `interval` seconds in a thread; `peak` since the last reset.
    ru_maxrss cannot be reset, so a phase's peak (e.g. only the training steps) needs sampling."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = rss_bytes()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


# ----- profiles ------------------------------------------------------------------------------------------

# The ops that do a step's matmul FLOPs (linear layers, attention scores) on CPU: the share of a profiled
# step spent outside them is the overhead a faster loop could remove.
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_flash_attention_backward"}


def is_collective(op: str) -> bool:
    return any(w in op.lower() for w in ("all_gather", "allgather", "reduce_scatter", "allreduce", "all_reduce",
                                         "broadcast", "c10d", "gloo", "record_param_comms", "wait"))


def profile_summary(events, top: int = 8) -> dict:
    """A profiled step (torch.profiler key_averages()) as data: shares of the self CPU time in matmul +
    attention kernels and in collectives, the optimizer step's seconds, the top ops and the op table."""
    from recipes_core.profiling import COLLECTIVE_KINDS

    total = sum(e.self_cpu_time_total for e in events) or 1
    share = lambda keep: sum(e.self_cpu_time_total for e in events if keep(e.key)) / total
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"optimizer_s": sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step#")) / 1e6,
            "shares": {"matmul + attention kernels": share(lambda k: k in MATMUL_OPS),
                       "collectives (incl. waits)": share(is_collective)},
            # one c10d::<op> event per collective (recipes_core.profiling.count_collectives); before, every event
            # is_collective matched was counted (FSDP's labels, copy-in/out, gloo's own events): 101 for tiny's
            # 24 collectives, 699 for SmolLM2's 154
            "collective_calls": sum(e.count for e in events if e.key.startswith("c10d::")
                                    and e.key.removeprefix("c10d::") in COLLECTIVE_KINDS),
            "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in ranked],
            "table": events.table(sort_by="self_cpu_time_total", row_limit=25)}


# ----- throughput ----------------------------------------------------------------------------------------

def steady_throughput(steps: list[dict], skip: int) -> dict:
    """tokens/s and supervised tokens/s over the steps after the first `skip` (warm-up) ones:
    sum of tokens / sum of step times, so long and short steps weigh by their duration."""
    kept = steps[skip:] if len(steps) > skip else steps[-1:]
    seconds = sum(s["step_time_s"] for s in kept)
    return {"steps_timed": len(kept), "seconds": seconds,
            "tokens_per_s": sum(s["tokens"] for s in kept) / seconds,
            "supervised_tokens_per_s": sum(s["supervised_tokens"] for s in kept) / seconds}


def finetune_overrides(out_dir: Path, steps: int, extra: list[str], recipe: str = "cookbook/tiny_full.yaml") -> list[str]:
    """Overrides that make recipes_core.finetune (on `recipe`) a pure training benchmark: no eval, no
    checkpoint, no progress bar or TensorBoard."""
    return ["--config", recipe, f"train.max_steps={steps}", "data.eval_path=",
            "checkpoint.save_final=false", "checkpoint.save_every=0", "train.eval_every=0",
            "log.progress_bar=false", "log.tensorboard=false", "checkpoint.resume=", f"checkpoint.output_dir={out_dir}", *extra]


def read_finetune_metrics(out_dir: Path) -> tuple[dict, list[dict]]:
    from recipes_core.metrics import read_metrics

    records = read_metrics(out_dir / "metrics.jsonl")
    start = next(r for r in records if r["kind"] == "start")
    return start, [r for r in records if r["kind"] == "train"]


# ----- results -------------------------------------------------------------------------------------------

def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("accelerate", "peft", "matplotlib"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        load = ", load average before the run %.1f" % os.getloadavg()[0]
    except OSError:
        load = ""
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU{load}"


def round_ratios(numerators: list[float], denominators: list[float]) -> tuple[float, str]:
    """A / B of two routes run once per round: the median of the per-round ratios and a min-max note."""
    per_round = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return statistics.median(per_round), f"{len(per_round)} round(s), min {min(per_round):.2f}x, max {max(per_round):.2f}x"


def ratio(name: str, value: float, target: str | None = None, met: bool | None = None, note: str = "") -> dict:
    return {"metric": name, "ratio": value, "target": target, "met": met, "note": note}


def save_result(name: str, title: str, command: str, settings: dict, rows: list[dict], ratios: list[dict],
                notes: list[str], smoke: bool, plot: str | None = None) -> dict:
    """Write results/<name>.json (results/smoke/ under --smoke, so a smoke run never overwrites the
    real figures) and regenerate RESULTS.md from the real ones."""
    result = {"name": name, "title": title, "command": command, "settings": settings, "rows": rows,
              "ratios": ratios, "notes": notes, "plot": plot, "machine": machine(), "versions": versions(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "smoke": smoke}
    folder = RESULTS_DIR / "smoke" if smoke else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    if not smoke:
        write_results_md()
    for r in ratios:
        verdict = {True: "MET", False: "MISSED", None: "-"}[r["met"]]
        print(f"{name}: {r['metric']}: {r['ratio']:.3f}x  target {r['target'] or '-'}  {verdict}")
    return result


def plot_path(name: str, smoke: bool) -> Path:
    folder = RESULTS_DIR / "smoke" if smoke else BENCH
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.png"


def bar_plot(path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str,
             target_line: float | None = None) -> str:
    """Grouped bars: one group per setting (e.g. model), one bar per route."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    if target_line is not None:
        ax.axhline(target_line, color="red", linestyle="--", linewidth=1, label="target")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


RESULTS_HEADER = """# Benchmarks

Each benchmark compares our recipe with what a user would pick instead, **in one run, on the same
machine, at the same settings**, and states the result as a ratio. Absolute numbers on this shared
2-core machine move with whatever else runs (the load average before each command is given per
benchmark), so read the ratios, not the absolute tokens/s.

Thread budget: the machine has 2 cores. A 2-rank run gives each rank `OMP_NUM_THREADS=1`. Single-process
routes (the plain loop, MFU, inference) run 1 thread: with other jobs on the cores, a 2-thread process
waits at every op's OpenMP barrier for a descheduled thread (the tiny plain loop ran 30x slower on 2
threads than on 1, back to back, in an earlier run), which would measure the neighbours. The
launcher's allocator (mimalloc preloaded by `python -m recipes_core.launch`, sections 1 and 6) is on in
our multi-rank runs, as users get it; section 1 also runs our recipe on glibc, and the peers run on glibc's
defaults as plain `torchrun` leaves them.
Nothing touches the Hugging Face Hub (`HF_HUB_OFFLINE=1`); SmolLM2-135M-Instruct comes from the GGUF
file (`make smollm2`), converted once by `recipes_core.models.gguf_to_hf` into
`runs/cache/smollm2-135m-instruct-hf`.

Run everything: `make bench` (= `.venv/bin/python benchmarks/run_all.py`); each benchmark alone is the
command in its section. `--smoke` runs the tiniest setting (used by `tests/test_benchmarks_smoke.py`);
smoke results go to `benchmarks/results/smoke/` and never into this file.
"""


def write_results_md() -> Path:
    results = {}
    timings = {}
    for path in RESULTS_DIR.glob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if path.stem == "run_all_timings":
            timings = data
        elif isinstance(data, dict) and "name" in data and "title" in data:
            results[data["name"]] = data
    names = [n for n in ORDER if n in results] + sorted(set(results) - set(ORDER))
    lines = [RESULTS_HEADER]
    if names:
        first = results[names[0]]
        lines.append(f"Machine: {first['machine'].split(', load')[0]}.  ")
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()) + ".\n")
    summary = [{"benchmark": results[n]["title"], "metric": r["metric"], "ratio": f"{r['ratio']:.2f}x",
                "target": r["target"] or "-", "met": {True: "yes", False: "**no**", None: "-"}[r["met"]]}
               for n in names for r in results[n]["ratios"]]
    lines += ["## Summary", ""] + markdown_table(summary) + [""]
    if timings:
        lines += ["Seconds per command in the last `run_all.py` (budget: 20 minutes each): " +
                  ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()) + ".", ""]
    for n in names:
        data = results[n]
        lines += [f"## {data['title']}", "", f"Command: `{data['command']}`  ", f"Run: {data['date']}; {data['machine']}.", ""]
        if data["settings"]:
            lines.append("Settings: " + "; ".join(f"{k} = {v}" for k, v in data["settings"].items()) + ".\n")
        lines += markdown_table(data["rows"]) + [""]
        if data["ratios"]:
            lines += markdown_table([{"metric": r["metric"], "ratio": f"{r['ratio']:.3f}x", "target": r["target"] or "-",
                                      "met": {True: "yes", False: "**no**", None: "-"}[r["met"]], "note": r["note"]}
                                     for r in data["ratios"]]) + [""]
        lines += [f"- {note}" for note in data["notes"]]
        if data.get("plot"):
            lines += ["", f"![{data['title']}]({data['plot']})"]
        lines.append("")
    analysis = BENCH / "analysis.md"  # hand-written findings (profiles, misses, what is not ours to fix)
    if analysis.exists():
        lines += [analysis.read_text(encoding="utf-8")]
    path = BENCH / "RESULTS.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def base_parser(description: str):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiniest setting: checks the script runs and writes a row")
    return parser


def command_line() -> str:
    return " ".join([".venv/bin/python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def finetune_inprocess(out_dir: Path, steps: int, extra: list[str],
                       recipe: str = "cookbook/tiny_full.yaml") -> tuple[dict, list[dict]]:
    """recipes_core.finetune in this process (a group of one): the smoke runs, which cannot afford a
    torchrun start-up each."""
    from recipes_core.config import load_config
    from recipes_core.finetune import run

    args = finetune_overrides(out_dir, steps, extra, recipe)
    run(load_config(args[1], args[2:]))
    return read_finetune_metrics(out_dir)
