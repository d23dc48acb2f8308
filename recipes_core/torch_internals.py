"""The private PyTorch internals this project relies on, fenced in one place.

Each hook names what it uses; `check()` reports the ones the installed torch no longer has, so an upgrade
that removes one fails loudly (tests/test_torch_internals.py, and a warning at import) instead of silently
bringing back the bug the hook prevents.
"""

from __future__ import annotations

import functools
import gc
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


HOOKS = {
    "torch._C._clear_DTensor_sharding_propagator_cache": lambda: hasattr(torch._C, "_clear_DTensor_sharding_propagator_cache"),
    "torch.distributed.tensor._redistribute.clear_redistribute_planner_cache": _has_redistribute_planner_cache,
    "torch.distributed.distributed_c10d._world.pg_map": _has_pg_map,
}


def check() -> list[str]:
    """The fenced hooks missing from the installed torch (empty when all are there)."""
    if not dist.is_available():
        return []
    return [name for name, present in HOOKS.items() if not present()]


_missing = check()
if _missing:
    warnings.warn(f"torch {torch.__version__} lacks {', '.join(_missing)}: recipes_core's process-group teardown "
                  "may no longer free the group before exit (see recipes_core/torch_internals.py)", RuntimeWarning)
