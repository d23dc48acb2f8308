"""The private PyTorch internals this project relies on, fenced in one place.

  process-group teardown   DTensor's sharding caches and c10d's group map (distributed.process_group)
  safe checkpoint loading  DefaultLoadPlanner's internals, overridden so that DCP's non-tensor values load
                           with weights_only=True (weights_only_load_planner, used by checkpoint.load_checkpoint)
  restricted unpickler     the private classes a DCP .metadata pickle is made of (DCP_METADATA_GLOBALS, which
                           safety.ALLOWED_GLOBALS admits)
  sharded loading          where a DTensor's local part lies in the full tensor (local_shape_and_offset, used
                           by distributed.load_sharded_weights)

Each hook in HOOKS names what it uses; `check()` reports the ones the installed torch no longer has, so an
upgrade that removes or renames one fails loudly (tests/test_torch_internals.py, and a warning at import)
instead of silently bringing back the bug the hook prevents.
"""

from __future__ import annotations

import functools
import gc
import importlib
import warnings

import torch
import torch.distributed as dist


def live_process_groups() -> list:
    """Every process group this process has created (the default one and its subgroups)."""
    from torch.distributed import distributed_c10d

    return list(distributed_c10d._world.pg_map)


def clear_dtensor_caches() -> None:
    """Empty DTensor's caches of sharding specs: the C++ fast-path cache, the redistribute planner's
    cache, and every functools cache defined under torch.distributed (sharding propagation, mesh
    topology). Each spec holds a DeviceMesh, which holds process groups."""
    torch._C._clear_DTensor_sharding_propagator_cache()
    from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache

    clear_redistribute_planner_cache()
    for obj in gc.get_objects():
        if type(obj) is functools._lru_cache_wrapper and \
                str(getattr(obj, "__module__", "")).startswith("torch.distributed"):
            obj.cache_clear()


def _has_redistribute_planner_cache() -> bool:
    try:
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache  # noqa: F401
    except ImportError:
        return False
    return True


def _has_pg_map() -> bool:
    from torch.distributed import distributed_c10d

    return isinstance(getattr(getattr(distributed_c10d, "_world", None), "pg_map", None), dict)


# ----- safe checkpoint loading -------------------------------------------------------------------------

def weights_only_load_planner():
    """A DCP load planner that unpickles non-tensor values (the trainer state, the scheduler's, ...) with
    torch.load(weights_only=True); DefaultLoadPlanner.load_bytes uses weights_only=False. It overrides that
    method and writes into the planner's private state (original_state_dict, mappings), as the original does."""
    from torch.distributed.checkpoint._nested_dict import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return WeightsOnlyLoadPlanner()


def _planner_internals_present() -> bool:
    """set_element exists, DefaultLoadPlanner still has load_bytes, and set_up_planner still fills the
    attributes our load_bytes writes through."""
    try:
        from torch.distributed.checkpoint._nested_dict import set_element  # noqa: F401
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    except ImportError:
        return False
    if "load_bytes" not in vars(DefaultLoadPlanner):  # the method our planner replaces (not the abstract one)
        return False
    planner = DefaultLoadPlanner()
    planner.set_up_planner({"trainer": {"step": 1}}, None, True)
    return all(hasattr(planner, name) for name in ("flatten_state_dict", "original_state_dict", "mappings",
                                                   "state_dict"))


# ----- sharded loading ---------------------------------------------------------------------------------

def local_shape_and_offset(tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset) of this rank's local part of a DTensor within the full tensor, by DTensor's own rule
    (torch.chunk along each Shard dim: the last ranks get fewer rows, or none; a Replicate dim takes all),
    which is also how FSDP2 shards. torch has no public function for it."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)


# (module, name) of torch's classes and functions a DCP .metadata pickle is built from, as torch 2.13 writes
# it; the leading-underscore ones are private. A rename makes the restricted unpickler refuse every checkpoint.
DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
}


def _importable(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


HOOKS = {
    "torch._C._clear_DTensor_sharding_propagator_cache": lambda: hasattr(torch._C, "_clear_DTensor_sharding_propagator_cache"),
    "torch.distributed.tensor._redistribute.clear_redistribute_planner_cache": _has_redistribute_planner_cache,
    "torch.distributed.distributed_c10d._world.pg_map": _has_pg_map,
    "torch.distributed.checkpoint DefaultLoadPlanner internals (load_bytes, _nested_dict.set_element)":
        _planner_internals_present,
    "torch.distributed.tensor._utils.compute_local_shape_and_global_offset":
        functools.partial(_importable, "torch.distributed.tensor._utils", "compute_local_shape_and_global_offset"),
    **{f"{module}.{name}": functools.partial(_importable, module, name) for module, name in sorted(DCP_METADATA_GLOBALS)
       if name.startswith("_")},
}


def check() -> list[str]:
    """The fenced hooks missing from the installed torch (empty when all are there)."""
    if not dist.is_available():
        return []
    return [name for name, present in HOOKS.items() if not present()]


_missing = check()
if _missing:
    warnings.warn(f"torch {torch.__version__} lacks {', '.join(_missing)}, private internals recipes_core relies on "
                  "(see recipes_core/torch_internals.py): the process-group teardown may no longer free the group "
                  "before exit, checkpoints may no longer load with weights_only=True, the restricted "
                  "unpickler may refuse every checkpoint, or loading the model's weights may fail", RuntimeWarning)
