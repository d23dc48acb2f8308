"""Stress test for the abort at exit (not part of `make test`: minutes of torchrun launches).

    python tests/stress_exit.py [--runs 20] [--only probe04,finetune,probe04_bare]

Runs every torchrun-launching program of the project that shards with FSDP2 over gloo, N times each, and
counts the runs that abort at exit ("terminate called without an active exception", SIGABRT, exit -6):
  probe04        notebook 04's memory probe, taken from the notebook itself (with process_group)
  probe04_bare   the same probe ending with a bare dist.destroy_process_group(), the way it was written
                 before (the "before" count)
  finetune       the recipe's CLI, 2 ranks, 3 steps, one checkpoint
Exit status 1 when any run of a non-bare program aborted or failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from recipes_core.launch import run_recipe, run_script

REPO = Path(__file__).resolve().parent.parent
ABORT = re.compile(r"terminate called|Signal 6|SIGABRT|exitcode\s*:\s*-6")


def notebook_probe(bare: bool) -> str:
    """The probe script notebook 04 writes (cell source between probe.write_text(''' and ''')."""
    cells = json.loads((REPO / "notebooks" / "04_fsdp_full_finetune.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "probe.write_text('''" in "".join(c["source"]))
    script = source.split("probe.write_text('''", 1)[1].split("''')", 1)[0]
    if bare:
        head, _, _ = script.partition('if __name__ == "__main__":')
        script = head.replace("from recipes_core.distributed import process_group\n", "") + (
            "if __name__ == \"__main__\":\n"
            "    from recipes_core.distributed import setup\n"
            "    main(setup())\n"
            "    dist.destroy_process_group()\n")
    return script


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", default="probe04,finetune")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stress_exit_"))
    programs = {}
    for name in ("probe04", "probe04_bare"):
        path = work / f"{name}.py"
        path.write_text(notebook_probe(bare=name.endswith("_bare")))
        programs[name] = lambda path=path: run_script(path, [""], nproc=2, cwd=REPO, check=False)
    programs["finetune"] = lambda: run_recipe(
        ["--config", "cookbook/tiny_full.yaml", "train.max_steps=3", "train.eval_every=0", "data.max_eval_examples=8",
         "log.progress_bar=false", "log.tensorboard=false", "checkpoint.save_optimizer=false",
         f"checkpoint.output_dir={work / 'finetune'}", "checkpoint.resume=", "checkpoint.save_every=3"],
        nproc=2, cwd=REPO, check=False)
    bad = 0
    for name in args.only.split(","):
        aborts = failures = 0
        start = time.perf_counter()
        for i in range(args.runs):
            result = programs[name]()
            output = result.stdout + result.stderr
            aborted = bool(ABORT.search(output))
            aborts += aborted
            failures += result.returncode != 0 and not aborted
            if result.returncode != 0:
                (work / f"{name}_{i}.log").write_text(output)
            print(f"{name} run {i + 1}/{args.runs}: exit {result.returncode}{' ABORT' if aborted else ''}", flush=True)
        print(f"{name}: {args.runs} runs, {aborts} aborted at exit, {failures} other failures "
              f"({time.perf_counter() - start:.0f} s; logs of failed runs in {work})", flush=True)
        if not name.endswith("_bare"):
            bad += aborts + failures
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
