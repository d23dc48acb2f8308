"""Checkpoint layout helpers, size predictions and safe loading, on real DCP folders (one process)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from recipes_core.checkpoint import (PAPER_MODELS, CheckpointError, find_latest, is_complete,
                                     load_train_params, measured_sizes, predict_sizes, rng_state, set_rng_state)
from recipes_core.torch_internals import weights_only_load_planner

REPO = Path(__file__).resolve().parent.parent


def write_step(output_dir: Path, step: int, n: int = 1000) -> Path:
    folder = output_dir / f"step_{step}"
    dcp.save({"model": {"w": torch.randn(n), "b": torch.randn(10)}}, checkpoint_id=str(folder))
    (folder / "train_params.yaml").write_text(f"step: {step}\n")
    return folder


def test_complete_and_incomplete_folders(tmp_path):
    folder = write_step(tmp_path, 5)
    assert is_complete(folder) and (folder / ".metadata").is_file() and list(folder.glob("__*_*.distcp"))
    shard = next(folder.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a save killed half-way
    assert not is_complete(folder)
    shard.unlink()
    assert not is_complete(folder)
    assert not is_complete(tmp_path / "nowhere")


def test_find_latest_follows_the_pointer_and_skips_incomplete_steps(tmp_path):
    assert find_latest(tmp_path) is None
    write_step(tmp_path, 2)
    write_step(tmp_path, 10)
    assert find_latest(tmp_path) == tmp_path / "step_10"  # no pointer: the highest complete step
    (tmp_path / "latest").write_text("step_2\n")
    assert find_latest(tmp_path) == tmp_path / "step_2"
    (tmp_path / "latest").write_text("step_10\n")
    (tmp_path / "step_10" / ".metadata").unlink()
    assert find_latest(tmp_path) == tmp_path / "step_2"  # the pointer names a broken folder: fall back
    shutil.copytree(tmp_path / "step_2", tmp_path / ".tmp_step_20")  # a save in progress is never chosen
    assert find_latest(tmp_path) == tmp_path / "step_2"
    assert load_train_params(tmp_path / "step_2") == {"step": 2}
    with pytest.raises(CheckpointError, match="train_params.yaml is missing"):
        load_train_params(tmp_path)


def test_predicted_sizes():
    sizes = predict_sizes(1_000_000)
    assert sizes == {"model": 4_000_000, "optim": 8_000_000, "total": 12_000_000}
    assert predict_sizes(1_000_000, save_optimizer=False)["total"] == 4_000_000
    assert predict_sizes(1_000_000, n_trainable=1000)["optim"] == 8000  # LoRA: moments for adapters only
    eight_b = predict_sizes(PAPER_MODELS["8B"])
    assert round(eight_b["total"] / 2**30, 1) == 89.7


def test_measured_sizes_come_from_the_metadata(tmp_path):
    folder = write_step(tmp_path, 1, n=250_000)
    sizes = measured_sizes(folder)
    assert 1_000_040 <= sizes["model"] < 1_000_040 * 1.01  # 4 bytes each plus the torch.save framing
    assert sizes["files_on_disk"] > sizes["model"]


def test_size_cli_on_paper(capsys):
    from recipes_core.checkpoint import main

    assert main(["size", "--params", "7B", "70B"]) == 0
    out = capsys.readouterr().out
    assert "7B" in out and "70B" in out and "(12 B/param)" in out and "788.5 GiB" in out


class Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_unpickles_code(tmp_path):
    """DCP stores non-tensor values with torch.save and its default planner loads them with
    weights_only=False; the checkpoint module's planner refuses anything but plain data."""
    from torch.distributed.checkpoint.api import CheckpointException

    folder, marker = tmp_path / "evil", tmp_path / "pwned"
    dcp.save({"trainer": {"step": 3, "note": Payload(marker)}}, checkpoint_id=str(folder))
    target = {"trainer": {"step": 0, "note": None}}
    with pytest.raises(CheckpointException) as info:
        dcp.load(target, checkpoint_id=str(folder), planner=weights_only_load_planner())
    assert "Weights only load failed" in str(next(iter(info.value.failures.values())))
    assert not marker.exists()
    good = tmp_path / "good"
    dcp.save({"trainer": {"step": 3, "epoch": 1}}, checkpoint_id=str(good))
    target = {"trainer": {"step": 0, "epoch": 0}}
    dcp.load(target, checkpoint_id=str(good), planner=weights_only_load_planner())
    assert target == {"trainer": {"step": 3, "epoch": 1}}


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]
