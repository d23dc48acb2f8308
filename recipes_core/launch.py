"""Launching the recipe (or your own distributed script) on local processes under torchrun.

From a shell you type the torchrun line yourself (or use cookbook/launch_single_node.sh); from Python (a
notebook cell, a test, a benchmark) build it with `launch_command`, or run it and get its output with
`run_recipe` / `run_script`:

    result = run_recipe(["--config", "cookbook/tiny_full.yaml", "train.max_steps=4"], nproc=2, log="run.log")

Every launch picks a free rendezvous port (two notebooks or test runs on one machine must not collide on
torchrun's default 29500) and sets MALLOC_ENV in the ranks' environment; the launcher preloads mimalloc into
the ranks (allocator_env, RECIPES_ALLOCATOR=glibc to keep glibc).

The launcher is `python -m recipes_core.launch`, which takes torchrun's arguments and is torchrun, with one
difference: when the job fails because its ranks exited with status 2 (bad input, already reported by rank 0
in one `error:` line), it exits 2 too, instead of torchrun's ChildFailedError traceback and status 1.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
from pathlib import Path

from recipes_core.errors import USER_ERROR_EXIT, UserError, command

# The ranks' memory allocator. FSDP frees and reallocates its per-layer all-gather buffers and gradients
# (1-100 MiB each) many times a step. glibc's malloc either keeps them resident once freed (its default: the
# mmap threshold grows up to 32 MiB after large frees, and per-rank memory hardly falls with more ranks:
# SmolLM2 on 2 and 4 ranks 1.6x and 2.3x the FSDP arithmetic), or, with MALLOC_ENV below, maps and faults
# in every block above 128 KiB afresh, which follows the arithmetic (the planner's 1.02x) but is slow.
# mimalloc (PyPI's cmeel-mimalloc, a dependency on Linux) reuses freed blocks and, with a purge delay of 0,
# gives unused pages back at once: SmolLM2, 2 CPU ranks, 1.33x (1.22-1.34) the tokens/s of the threshold
# setting (about glibc's default speed) for 1.06x its peak RSS; measured / planner 1.06-1.09 for SmolLM2 at 1,
# 2 and 4 ranks and 1.09-1.12 in tests/test_plan.py (benchmarks/RESULTS.md, sections 1 and 6).
# `python -m recipes_core.launch` (and so launch_command, run_recipe and cookbook/launch_single_node.sh)
# preloads it into the ranks; RECIPES_ALLOCATOR=glibc keeps glibc with MALLOC_ENV, and an LD_PRELOAD already set is
# left alone. Harmless on CUDA, where tensors are not malloc's. MALLOC_ENV stays in every launch command:
# it is what glibc uses wherever mimalloc is not loaded (the launcher itself, nproc=0, other platforms).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
ALLOCATORS = ("mimalloc", "glibc")


def mimalloc_library() -> str | None:
    """Path of the libmimalloc shared library that the cmeel-mimalloc wheel installs, or None."""
    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    for name in ("libmimalloc.so.3", "libmimalloc.so"):
        path = Path(dist.locate_file(f"cmeel.prefix/lib/{name}"))
        if path.is_file():
            return str(path)
    return None


def allocator_env(environ: dict | None = None) -> dict[str, str]:
    """What the launcher adds to its ranks' environment: LD_PRELOAD of mimalloc on Linux where it is
    installed, unless RECIPES_ALLOCATOR=glibc or LD_PRELOAD is already set (then nothing)."""
    environ = os.environ if environ is None else environ
    choice = environ.get("RECIPES_ALLOCATOR", "mimalloc")
    if choice not in ALLOCATORS:
        raise UserError(f"environment variable RECIPES_ALLOCATOR={choice!r}: set it to one of {', '.join(ALLOCATORS)}, or unset it")
    if choice != "mimalloc" or environ.get("LD_PRELOAD") or not sys.platform.startswith("linux"):
        return {}
    library = mimalloc_library()
    if library is None:
        return {}
    # Freed memory goes back to the OS at once rather than after 10 ms: as fast here, and the peak RSS
    # stays near the live tensors (the planner's 15%: 1.11x against 1.28x with the 10 ms default).
    return {"LD_PRELOAD": library, "MIMALLOC_PURGE_DELAY": environ.get("MIMALLOC_PURGE_DELAY", "0")}


def allocator_in_use() -> str:
    """'mimalloc' when this process runs with mimalloc loaded (from /proc/self/maps), else 'glibc' (or
    the platform's C library)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "mimalloc" if "libmimalloc" in maps else "glibc"


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


@command
def main(argv: list[str] | None = None) -> None:
    """torchrun (same arguments), except that a job whose first failing rank exited with status 2 (a
    UserError, reported once by rank 0) exits 2 without torchrun's traceback of its own launcher; and the
    ranks start with allocator_env() (mimalloc preloaded) in their environment."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.update(allocator_env())  # torchrun starts the ranks with this process's environment
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode == USER_ERROR_EXIT:
            sys.exit(USER_ERROR_EXIT)
        raise


if __name__ == "__main__":
    main()
