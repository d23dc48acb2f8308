"""Run many bad-input cases through `recipes_core.finetune.main` (the command's own entry point, with its
error wrapper) on every rank of one torchrun job: one launch instead of one per case (each costs ~10 s).

    python -m recipes_core.launch --nproc_per_node 2 tests/bad_inputs_ranks.py CASES.json OUT_DIR

CASES.json maps a case name to its finetune argv. The process group is created once here, so each case's
run() joins it instead of creating its own; its preflight agrees over it exactly as in a fresh job. Each
rank writes OUT_DIR/rank<r>.json: {case: {"code": exit status, "output": what it printed}}.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

from recipes_core import distributed as D
from recipes_core.finetune import main


def run_cases(cases: dict[str, list[str]], env: D.DistEnv) -> dict:
    results = {}
    for name, argv in cases.items():
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            try:
                code = main(argv)
            except SystemExit as exit_info:
                code = exit_info.code
            except Exception:  # a bug, not the answer to bad input: keep its traceback for the test to show
                traceback.print_exc()
                code = "exception"
        results[name] = {"code": code, "output": captured.getvalue()}
    return results


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    env = D.setup("gloo")
    try:
        results = run_cases(cases, env)
    finally:
        D.teardown(env)
    Path(sys.argv[2], f"rank{env.rank}.json").write_text(json.dumps(results))
