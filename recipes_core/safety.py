"""Reading checkpoint files without running code they carry.

`torch.distributed.checkpoint` reads a checkpoint's `.metadata` with plain `pickle.load`, and a pickle
can call any importable function while it loads. A checkpoint downloaded from somewhere, or left in a
shared folder, is untrusted input: before DCP touches it, `check_checkpoint_metadata` unpickles it with
a restricted unpickler that admits only the classes checkpoint metadata is made of, and refuses
anything else (os.system, subprocess, builtins.eval ...) without calling it.

Other files: `load_torch_file` is `torch.load(weights_only=True)`; model weights are safetensors.
"""

from __future__ import annotations

from recipes_core.errors import UserError

import pickle
from pathlib import Path

import torch

from recipes_core.torch_internals import DCP_METADATA_GLOBALS

# (module, name) pairs a DCP .metadata pickle is built from: torch's own (some private, so fenced and checked
# against the installed torch in torch_internals) and the plain Python containers and paths it holds.
ALLOWED_GLOBALS = DCP_METADATA_GLOBALS | {
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"),
}


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint file that would run code, or is not what it claims to be."""


class CodeInCheckpointError(UnsafeCheckpointError):
    """The file refers to a callable no checkpoint contains: refused outright, never skipped over."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format,
                                                                         torch.layout)):
            return getattr(torch, name)
        raise CodeInCheckpointError(
            f"{self.source}: refers to {module}.{name}, which checkpoint metadata never contains; refusing to "
            "load it (it could run code). Only load checkpoints you produced or trust.")


def check_checkpoint_metadata(checkpoint_dir: str | Path):
    """Unpickle `<dir>/.metadata` safely and return the Metadata; raise UnsafeCheckpointError otherwise."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(checkpoint_dir) / ".metadata"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no .metadata file; this is not a complete DCP checkpoint")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated or corrupt pickle
        raise UnsafeCheckpointError(f"{path}: unreadable checkpoint metadata ({type(err).__name__}: {err}); "
                                    "the checkpoint is damaged or incomplete") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint Metadata")
    return metadata


def load_torch_file(path: str | Path, map_location="cpu"):
    """torch.load that only reconstructs tensors and plain containers (never arbitrary objects)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(f"{path}: refused by torch.load(weights_only=True): {err}") from None
