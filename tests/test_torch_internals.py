"""The private PyTorch hooks behind the process-group teardown exist in the installed torch: an upgrade
that removes one fails here instead of silently bringing back the abort at exit."""

from recipes_core import torch_internals


def test_every_fenced_torch_hook_exists():
    assert torch_internals.check() == []


def test_a_missing_hook_is_reported(monkeypatch):
    monkeypatch.setitem(torch_internals.HOOKS, "torch.no_such_hook", lambda: False)
    assert torch_internals.check() == ["torch.no_such_hook"]
