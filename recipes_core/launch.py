"""Launching the recipe (or your own distributed script) on local processes under torchrun.

From a shell you type the torchrun line yourself (or use cookbook/launch_single_node.sh); from Python (a
notebook cell, a test, a benchmark) build it with `launch_command`, or run it and get its output with
`run_recipe` / `run_script`:

    result = run_recipe(["--config", "cookbook/tiny_full.yaml", "train.max_steps=4"], nproc=2, log="run.log")

Every launch picks a free rendezvous port (two notebooks or test runs on one machine must not collide on
torchrun's default 29500) and sets MALLOC_ENV in the ranks' environment.

The launcher is `python -m recipes_core.launch`, which takes torchrun's arguments and is torchrun, with one
difference: when the job fails because its ranks exited with status 2 (bad input, already reported by rank 0
in one `error:` line), it exits 2 too, instead of torchrun's ChildFailedError traceback and status 1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

# glibc malloc setting for CPU training runs: every allocation above 128 KiB gets its own mapping and goes
# back to the OS when freed. glibc's default threshold grows (up to 32 MiB) after large frees (AdamW's first
# allocation, rank 0's full copy where it loads a model to broadcast it); after that FSDP's per-layer
# all-gather buffers and gradients come from malloc's arenas and stay resident once freed, so per-rank RSS
# barely falls with the number of ranks (SmolLM2 on 2 and 4 ranks: 1.6x and 2.3x the FSDP arithmetic of
# the time, against 0.99x and 1.02x with this; with this setting against today's planner, recipes_core.plan:
# 1.02x and 1.06x; benchmarks/RESULTS.md). An
# allocator setting, not FSDP's; glibc reads it at process start, hence set by the launchers. Harmless on
# CUDA (GPU memory is not malloc's) and ignored where the C library is not glibc.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class LaunchFailed(RuntimeError):
    """A launched run exited with a non-zero status; the message ends with the tail of its output."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(nproc: int, module: str = "recipes_core.finetune", args: list[str] | tuple = (),
                   master_port: int | None = None, script: str | Path | None = None) -> list[str]:
    """The command that runs `module` (or the file `script`) on nproc local processes under torchrun
    (through this module's main, see the top of the file; nproc=0: one plain process, no torchrun), with MALLOC_ENV in its environment (`env VAR=value ...`; a
    value already set in this environment wins)."""
    env = ["env", *(f"{k}={os.environ.get(k, v)}" for k, v in MALLOC_ENV.items())]
    target = [str(script)] if script is not None else ["-m", module]
    if nproc == 0:
        return [*env, sys.executable, *target, *args]
    return [*env, sys.executable, "-m", "recipes_core.launch", "--nproc_per_node", str(nproc),
            "--master_port", str(master_port or free_port()), *target, *args]


def _run(command: list[str], log: str | Path | None, cwd: str | Path | None, check: bool,
         env: dict | None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env=None if env is None else {**os.environ, **env})
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(result.stdout + result.stderr)
    if check and result.returncode != 0:
        raise LaunchFailed(f"exit status {result.returncode}: {' '.join(command[-6:])}\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")
    return result


def run_recipe(args: list[str], nproc: int = 2, log: str | Path | None = None, cwd: str | Path | None = None,
               check: bool = True, env: dict | None = None,
               module: str = "recipes_core.finetune") -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node nproc -m recipes_core.finetune ARGS` and wait for it: its output
    goes to `log` (if given) and comes back in the result; a failed run raises LaunchFailed with the end
    of its output (check=False returns it instead)."""
    return _run(launch_command(nproc, module, [str(a) for a in args]), log, cwd, check, env)


def run_script(script: str | Path, args: list[str] = (), nproc: int = 2, log: str | Path | None = None,
               cwd: str | Path | None = None, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run your own Python file on nproc ranks under torchrun (write it with
    recipes_core.distributed.process_group, so it tears down cleanly) and wait for it."""
    return _run(launch_command(nproc, args=[str(a) for a in args], script=script), log, cwd, check, env)


def main(argv: list[str] | None = None) -> None:
    """torchrun (same arguments), except that a job whose first failing rank exited with status 2 (a
    UserError, reported once by rank 0) exits 2 without torchrun's traceback of its own launcher."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from recipes_core.errors import USER_ERROR_EXIT

    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode == USER_ERROR_EXIT:
            sys.exit(USER_ERROR_EXIT)
        raise


if __name__ == "__main__":
    main()
