"""Malicious checkpoint files are refused without running their payload."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from recipes_core.safety import UnsafeCheckpointError, check_checkpoint_metadata, load_torch_file


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def real_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "step_1"
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict(),
              "trainer": {"step": 1, "rng": torch.get_rng_state()}}, checkpoint_id=str(path))
    return path


def test_real_metadata_is_accepted(real_checkpoint):
    metadata = check_checkpoint_metadata(real_checkpoint)
    assert "model.weight" in metadata.state_dict_metadata


def test_malicious_metadata_is_refused_without_running(real_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    (real_checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="os.system|posix.system"):
        check_checkpoint_metadata(real_checkpoint)
    assert not marker.exists()


def test_truncated_metadata_is_refused(real_checkpoint):
    data = (real_checkpoint / ".metadata").read_bytes()
    (real_checkpoint / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsafeCheckpointError, match="damaged or incomplete"):
        check_checkpoint_metadata(real_checkpoint)


def test_missing_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .metadata"):
        check_checkpoint_metadata(tmp_path)


def test_malicious_pt_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "rng_rank0.pt"
    torch.save({"state": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        load_torch_file(path)
    assert not marker.exists()
    torch.save({"rng": torch.get_rng_state(), "step": 3}, path)
    assert load_torch_file(path)["step"] == 3
