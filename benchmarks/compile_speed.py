"""Benchmark: train.compile against eager, the recipe on 2 CPU ranks (torchrun, gloo, fp32, 1 thread per rank).

    .venv/bin/python benchmarks/compile_speed.py [--models tiny,smollm2] [--rounds 3] [--smoke]

The same recipe and batches as benchmarks/train_compare.py (its SETTINGS), once with train.compile=false and
once with true, interleaved round by round (eager, compiled, then compiled, eager, ...) so that a busy machine
hits both alike. Per run: steady tokens/s over the steps after the first `skip` (the compiled run's first
step is the compile), and the first step's seconds. The ratio compiled / eager is taken per round; its median
and min-max are reported. Inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR, one folder for the whole run)
is cold in the first round only: the first-step seconds show what a first run pays and what a later one does.
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402
from benchmarks.train_compare import SETTINGS, SMOKE  # noqa: E402

STEPS = {"tiny": 14, "smollm2": 6}  # more steps than train_compare: the compiled run's first one is the compile
SKIP = {"tiny": 2, "smollm2": 2}


def run(model: str, s: dict, compile: bool, cache: Path, smoke: bool) -> dict:
    out = C.RUNS / f"compile_speed_{model}_{'compiled' if compile else 'eager'}"
    extra = ["model.source=hf", f"model.path={C.model_dir(model)}", f"data.max_seq_len={s['seq']}",
             f"train.micro_batch_size={s['micro']}", f"train.grad_accum_steps={s['accum']}", f"train.lr={s['lr']}",
             "train.warmup_steps=0", "train.lr_schedule=cosine", "train.seed=42",
             f"data.max_train_examples={s.get('examples', 0)}", f"train.compile={str(compile).lower()}"]
    steps = s["steps"] if smoke else STEPS[model]
    C.run_cmd(C.torchrun(2, "recipes_core.finetune", C.finetune_overrides(out, steps, extra)), threads=1,
              timeout=1800, env_extra={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    _, records = C.read_finetune_metrics(out)
    row = C.steady_throughput(records, s["skip"] if smoke else SKIP[model])
    row["first_step_s"] = records[0]["step_time_s"]
    row["losses"] = [r["loss"] for r in records]
    return row


def main(argv=None):
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    models = ["tiny"] if args.smoke else args.models.split(",")
    result = None
    for model in models:  # one section per model, results/compile_speed_<model>.json
        result = compare(model, 1 if args.smoke else args.rounds, args.smoke)
    return result


def compare(model: str, rounds: int, smoke: bool) -> dict:
    s = SMOKE if smoke else SETTINGS[model]
    cache = C.RUNS / f"compile_speed_{model}_inductor_cache"
    shutil.rmtree(cache, ignore_errors=True)  # the first round pays the compile in full
    rows, per_round = [], []
    for i in range(rounds):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {compile: run(model, s, compile, cache, smoke) for compile in order}
        per_round.append(got[True]["tokens_per_s"] / got[False]["tokens_per_s"])
        for compile in (False, True):
            r = got[compile]
            rows.append({"model": model, "round": i + 1, "train.compile": compile, "tokens/s": r["tokens_per_s"],
                         "first step (s)": r["first_step_s"], "steps timed": r["steps_timed"],
                         "max |loss difference| vs eager": max(abs(a - b) for a, b in
                                                               zip(r["losses"], got[False]["losses"]))})
    ratios = [C.ratio(f"{model}: compiled / eager tokens/s (median of {rounds} rounds)", statistics.median(per_round),
                      None, None, f"min {min(per_round):.2f}, max {max(per_round):.2f}")]
    notes = ["2 ranks, 1 thread each, fp32, gloo; the first round with a cold inductor cache, later rounds warm",
             f"tokens/s over the steps after the first {s['skip'] if smoke else SKIP[model]} "
             "(the compiled run's first step is its compile)"]
    return C.save_result(f"compile_speed_{model}", f"train.compile on {model}: compiled / eager training throughput",
                         C.command_line(), {"model": model, "rounds": rounds, "settings": s}, rows, ratios, notes, smoke)


if __name__ == "__main__":
    main()
