"""Faults survived, nothing lost: a rank SIGKILLed in the middle of a save and again after a step, with
torchrun restarting the job on its own (checkpoint.resume=auto), ends with exactly the losses of an
uninterrupted run.

Two 2-rank torchrun jobs on the tiny model (8 steps, checkpoints every 2):
  reference  uninterrupted
  faulted    RECIPES_FAULT_KILL_IN_SAVE=4 and RECIPES_FAULT_KILL_AT_STEP=7 (rank 0), one torchrun job
             with --max-restarts=2, which torchrun restarts on its own after each kill:
             attempt 1 runs steps 1-4 and dies while step_4 is being saved (shards and .metadata in
             .tmp_step_4/, no rename); attempt 2 removes .tmp_step_4, resumes from step_2, saves 4 and 6,
             dies right after step 7; attempt 3 resumes from step_6 and finishes.
Every loss logged by any attempt must equal the reference loss of that step, bit for bit (CPU, gloo).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

STEPS, SAVE_EVERY, KILL_IN_SAVE, KILL_AT_STEP = 8, 2, 4, 7
OVERRIDES = ["data.format=chat", "data.train_path=cookbook/data/chat_train.jsonl", "data.eval_path=",
             "data.max_seq_len=64", "data.max_train_examples=48", "train.micro_batch_size=2",
             "train.grad_accum_steps=1", "train.lr=2e-3", "train.warmup_steps=2", f"train.max_steps={STEPS}",
             "train.seed=11", "train.eval_every=0", f"checkpoint.save_every={SAVE_EVERY}", "checkpoint.keep_last_n=0",
             "checkpoint.resume=auto", "log.progress_bar=false", "log.tensorboard=false", "log.peak_flops=1e12"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECIPES_FAULT_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def torchrun(nproc: int, out: Path, model_dir: Path, extra: list[str] = (), restarts: int = 0,
             env: dict | None = None, timeout: int = 400, check: bool = True) -> subprocess.CompletedProcess:
    # Restarts rely on distributed._attempt_store: without its per-attempt prefix the restarted gloo group
    # can read the killed rank's address from the store and fail to connect.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", out.name,
           "--max-restarts", str(restarts), "--monitor-interval", "0.5",
           "-m", "recipes_core.finetune", "--config", str(REPO / "cookbook" / "tiny_full.yaml"), *OVERRIDES,
           "model.source=hf", f"model.path={model_dir}", f"checkpoint.output_dir={out}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    print(f"torchrun {nproc} ranks, {restarts} restarts allowed: {time.perf_counter() - start:.1f} s")
    if check and proc.returncode != 0:
        events = [line[:300] for line in (proc.stdout + proc.stderr).splitlines()
                  if re.search(r"FAULT|resumed|removed|Error|error|failed|restart", line)]
        pytest.fail(f"torchrun failed (exit {proc.returncode}):\n" + "\n".join(events[-60:]))
    return proc


def train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def start_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "start"]


@pytest.fixture(scope="module")
def recovery_runs(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("recovery")
    model = tiny_models["instruct"]
    reference = torchrun(2, root / "reference", model)
    env = child_env(RECIPES_FAULT_KILL_IN_SAVE=str(KILL_IN_SAVE), RECIPES_FAULT_KILL_AT_STEP=str(KILL_AT_STEP),
                     RECIPES_FAULT_RANK="0")
    # One torchrun job; torchrun itself restarts it after each SIGKILL (--max-restarts=2).
    faulted = torchrun(2, root / "faulted", model, env=env, restarts=2)
    return {"reference": root / "reference", "faulted": root / "faulted", "reference_proc": reference,
            "faulted_proc": faulted}


@pytest.mark.slow
def test_killed_rank_restarts_and_finishes_with_identical_losses(recovery_runs):
    """Item 1: SIGKILL after step 7; torchrun restarts the job, resume=auto picks step_6, and every loss
    (including the steps run twice) equals the uninterrupted run's."""
    out = recovery_runs["faulted"]
    assert (out / f".fault_kill_at_step_{KILL_AT_STEP}").is_file(), "the fault did not fire"
    reference = {r["step"]: r["loss"] for r in train_records(recovery_runs["reference"])}
    assert sorted(reference) == list(range(1, STEPS + 1))
    records = train_records(out)
    assert {r["step"] for r in records} == set(range(1, STEPS + 1))
    mismatched = [(r["step"], r["loss"], reference[r["step"]]) for r in records if r["loss"] != reference[r["step"]]]
    print(f"{len(records)} losses logged by 3 attempts of one job; reference: {[reference[s] for s in sorted(reference)]}")
    assert not mismatched, mismatched
    # Three attempts: fresh, resumed from step 2 (after the crashed save of 4), resumed from step 6.
    assert [r["step"] for r in start_records(out)] == [0, SAVE_EVERY, 6]
    logs = recovery_runs["faulted_proc"].stdout + recovery_runs["faulted_proc"].stderr
    assert f"resumed from {out / 'step_6'} at step 6" in logs
    assert (out / "latest").read_text().strip() == f"step_{STEPS}"
    # Steps 3..4 and 7 were run twice (lost work redone), never skipped.
    counts = {s: sum(r["step"] == s for r in records) for s in range(1, STEPS + 1)}
    assert counts[3] == counts[4] == 2 and counts[8] == 1, counts


@pytest.mark.slow
def test_crash_during_save_keeps_the_previous_checkpoint(recovery_runs):
    """Item 2: SIGKILL after the shards of step_4 were written into .tmp_step_4, before the rename: the
    restarted job resumed from step_2 (never from the unfinished folder) and removed .tmp_step_4."""
    from recipes_core.checkpoint import find_latest, is_complete

    out = recovery_runs["faulted"]
    marker = (out / f".fault_kill_in_save_{KILL_IN_SAVE}").read_text().splitlines()
    written = set(marker[1:])
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= written, marker  # killed after the shards
    assert "train_params.yaml" not in written
    logs = recovery_runs["faulted_proc"].stdout + recovery_runs["faulted_proc"].stderr
    assert f"resumed from {out / f'step_{SAVE_EVERY}'} at step {SAVE_EVERY}" in logs
    assert f"removed {out / f'.tmp_step_{KILL_IN_SAVE}'}" in logs
    assert not list(out.glob(".tmp_step_*"))
    assert all(is_complete(out / f"step_{s}") for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    assert find_latest(out) == out / f"step_{STEPS}"


def test_unfinished_save_is_never_chosen(tmp_path):
    """find_latest (what resume=auto uses) passes over .tmp_step_* and a step folder whose shard is
    short or missing, and preflight removes the stale temporary folder on the next start."""
    import shutil

    import torch
    import torch.distributed.checkpoint as dcp

    from recipes_core.checkpoint import find_latest
    from recipes_core.preflight import remove_stale_tmp

    def save(name: str) -> Path:
        dcp.save({"model": {"w": torch.arange(1000.0)}}, checkpoint_id=str(tmp_path / name), no_dist=True)
        (tmp_path / name / "train_params.yaml").write_text("step: 0\n")
        return tmp_path / name

    save("step_2")
    tmp = save(".tmp_step_4")  # complete-looking, but never renamed
    (tmp_path / "latest").write_text("step_2\n")
    assert find_latest(tmp_path) == tmp_path / "step_2"
    shutil.copytree(tmp, tmp_path / "step_6")
    shard = next((tmp_path / "step_6").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated shard
    (tmp_path / "latest").write_text("step_6\n")
    assert find_latest(tmp_path) == tmp_path / "step_2"
    assert remove_stale_tmp(tmp_path) == [tmp] and not tmp.exists()
