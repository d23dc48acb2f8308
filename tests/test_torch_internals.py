"""The private PyTorch hooks recipes_core relies on (process-group teardown, the weights-only load planner,
the restricted unpickler's private metadata classes) exist in the installed torch: an upgrade that removes
one fails here instead of silently bringing back the bug the hook prevents."""

from recipes_core import torch_internals


def test_every_fenced_torch_hook_exists():
    assert torch_internals.check() == []


def test_a_missing_hook_is_reported(monkeypatch):
    monkeypatch.setitem(torch_internals.HOOKS, "torch.no_such_hook", lambda: False)
    assert torch_internals.check() == ["torch.no_such_hook"]


def test_an_upgrade_that_changes_the_load_planner_or_a_metadata_class_is_reported(monkeypatch):
    """The weights-only load planner overrides DefaultLoadPlanner.load_bytes and writes through its private
    state; the restricted unpickler admits torch's private metadata classes by name. Either gone: reported."""
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    monkeypatch.delattr(DefaultLoadPlanner, "load_bytes")
    monkeypatch.delattr(filesystem, "_StorageInfo")
    missing = torch_internals.check()
    assert "torch.distributed.checkpoint.filesystem._StorageInfo" in missing, missing
    assert any("DefaultLoadPlanner" in name for name in missing), missing
