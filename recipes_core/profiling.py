"""Where the step time goes: torch.profiler over a few optimizer steps of a training run.

Turned on with `log.profile_steps=N`: steps 1-2 run unrecorded (allocation, first all-gathers, kernel
selection), the next one is a profiler warm-up, then N steps are recorded. Each rank writes
<output_dir>/profile/rank<r>_ops.txt (operators sorted by their own time on the device, then on the CPU)
and rank<r>_trace.json (open it in https://ui.perfetto.dev or chrome://tracing to see the gaps where
the GPU waits for the CPU).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

WAIT_STEPS, WARMUP_STEPS = 2, 1


class StepProfiler:
    """`step()` after every optimizer step; does nothing when steps is 0."""

    def __init__(self, steps: int, out_dir: str | Path, rank: int, device: torch.device):
        self.prof = None
        if steps <= 0:
            return
        self.folder, self.rank = Path(out_dir) / "profile", rank
        self.sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = profile(activities=activities, on_trace_ready=self._write,
                            schedule=schedule(wait=WAIT_STEPS, warmup=WARMUP_STEPS, active=steps, repeat=1))
        self.prof.start()

    def _write(self, prof) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by=self.sort, row_limit=40)
        (self.folder / f"rank{self.rank}_ops.txt").write_text(table + "\n", encoding="utf-8")
        prof.export_chrome_trace(str(self.folder / f"rank{self.rank}_trace.json"))
        if self.rank == 0:
            print(f"profile written to {self.folder}/ (rank*_ops.txt, rank*_trace.json)", flush=True)

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None


# ----- counting collectives ---------------------------------------------------------------------------

# What torch.distributed runs, named as the dispatcher names it (c10d::<op>): one profiler event per
# collective, whichever API called it (FSDP2's all_gather_single and reduce_scatter_single, dist.all_reduce,
# DTensor's functional collectives, which call c10d::allreduce_ themselves). Counting every profiler event
# with "all_gather" or "gloo" in its name instead counts each collective 4-5 times: FSDP's record_function
# labels (FSDP::all_gather, fsdp::all_gather_copy_in, FSDP::all_gather_copy_out), gloo's own event, the waits.
COLLECTIVE_KINDS = {"_allgather_base_": "all_gather", "allgather_": "all_gather",
                    "allgather_into_tensor_coalesced_": "all_gather", "allgather_coalesced_": "all_gather",
                    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
                    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "allreduce_": "all_reduce",
                    "allreduce_coalesced_": "all_reduce", "broadcast_": "broadcast", "barrier": "barrier",
                    "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "gather_": "gather",
                    "scatter_": "scatter", "reduce_": "reduce"}
_DTYPE_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4}


class CollectiveCount:
    """What count_collectives saw: calls and bytes per kind ("all_gather", "reduce_scatter", "all_reduce", ...).

    bytes: the full-size tensor of each collective (an all-gather's output, a reduce-scatter's input) as
    the profiler records its shape; a collective over a list of tensors (dist.all_reduce) has no recorded
    shape and adds its call but no bytes (the recipe's all-reduces are a few scalars)."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def add(self, event) -> None:
        kind = COLLECTIVE_KINDS.get(event.name.removeprefix("c10d::"))
        if not event.name.startswith("c10d::") or kind is None:
            return
        self.calls[kind] = self.calls.get(kind, 0) + 1
        sizes = [_numel(shape) * _DTYPE_BYTES.get(dtype, 0)
                 for shape, dtype in zip(event.input_shapes or [], event.input_dtypes or []) if shape]
        self.bytes[kind] = self.bytes.get(kind, 0) + max(sizes, default=0)

    def __repr__(self) -> str:
        parts = ", ".join(f"{kind} {n} ({self.bytes[kind] / 2**20:.1f} MiB)" for kind, n in sorted(self.calls.items()))
        return f"{self.total} collectives: {parts}"


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


@contextmanager
def count_collectives():
    """Count the collectives this process runs inside the block (torch.profiler, CPU events with shapes):

        with count_collectives() as counted:
            train_step(...)
        print(counted)   # e.g. "24 collectives: all_gather 16 (5.9 MiB), all_reduce 3 (0.0 MiB), ..."

    Counts, not times: the profiler slows the block down."""
    counted = CollectiveCount()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield counted
    for event in prof.events():
        counted.add(event)
