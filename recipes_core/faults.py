"""Test-only fault injection: kill a rank at a chosen point, once, to prove that nothing is lost.

Off unless an environment variable asks for it; each switch costs one dictionary lookup per call.

    RECIPES_FAULT_KILL_AT_STEP=<k>   SIGKILL this process right after optimizer step k (before step k's
                                     checkpoint, so the work since the last checkpoint is lost)
    RECIPES_FAULT_KILL_IN_SAVE=<k>   SIGKILL this process while checkpoint step_<k> is being saved: the
                                     shards and .metadata are in the save folder (checkpoint.tmp_step_dir),
                                     the rename has not happened
    RECIPES_FAULT_RANK=<r>           the global rank that is killed (default 0)
    RECIPES_FAULT_DISK_FREE_BYTES=<n>  preflight sees n bytes free on the output disk (a full disk without
                                     filling one)

Each kill fires once per output folder: before killing itself the rank writes a marker file
`<output_dir>/.fault_<name>_<k>`, so the run that `torchrun --max-restarts` starts again goes past the
same step. Used by tests/test_recovery.py and tests/test_multinode.py.
"""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path

KILL_AT_STEP = "RECIPES_FAULT_KILL_AT_STEP"
KILL_IN_SAVE = "RECIPES_FAULT_KILL_IN_SAVE"
FAULT_RANK = "RECIPES_FAULT_RANK"
DISK_FREE_BYTES = "RECIPES_FAULT_DISK_FREE_BYTES"


def _kill_once(name: str, switch: str, step: int, rank: int, output_dir: str | Path,
               listed: Path | None = None) -> None:
    wanted = os.environ.get(switch)
    if not wanted or int(wanted) != step or int(os.environ.get(FAULT_RANK, "0")) != rank:
        return
    marker = Path(output_dir) / f".fault_{name}_{step}"
    if marker.exists():
        return
    files = sorted(p.name for p in listed.glob("*")) if listed is not None else []  # what the marker records
    marker.write_text(f"rank {rank} killed by {switch}={step} (pid {os.getpid()})\n"
                      + "".join(f"{f}\n" for f in files), encoding="utf-8")
    print(f"FAULT: {switch}={step}: SIGKILL rank {rank} (pid {os.getpid()})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def at_step(step: int, rank: int, output_dir: str | Path) -> None:
    """Kill here if RECIPES_FAULT_KILL_AT_STEP names this optimizer step (and FAULT_RANK this rank)."""
    _kill_once("kill_at_step", KILL_AT_STEP, step, rank, output_dir)


def arm_kill_at_step(optimizer, first_step: int, rank: int, output_dir: str | Path) -> None:
    """Set up by the recipe before its loop, so the loop carries no test hook: when RECIPES_FAULT_KILL_AT_STEP
    is set, an optimizer step post-hook counts the steps from `first_step` (the resumed step) and calls
    at_step after each. Unset, nothing is registered."""
    if not os.environ.get(KILL_AT_STEP):
        return
    steps = itertools.count(first_step + 1)
    optimizer.register_step_post_hook(lambda *_: at_step(next(steps), rank, output_dir))



def in_save(step: int, rank: int, output_dir: str | Path, save_folder: str | Path) -> None:
    """Called by save_checkpoint after the shards are written into save_folder, before it is renamed (the
    marker lists the files that were there)."""
    _kill_once("kill_in_save", KILL_IN_SAVE, step, rank, output_dir, Path(save_folder))


def disk_free_bytes(path: str | Path) -> int:
    """Free bytes on the file system of `path` (or the injected figure)."""
    import shutil

    injected = os.environ.get(DISK_FREE_BYTES)
    if injected:
        return int(float(injected))
    return shutil.disk_usage(path).free
