"""Where the step time goes: torch.profiler over a few optimizer steps of a training run.

Turned on with `log.profile_steps=N`: steps 1-2 run unrecorded (allocation, first all-gathers, kernel
selection), the next one is a profiler warm-up, then N steps are recorded. Each rank writes
<output_dir>/profile/rank<r>_ops.txt (operators sorted by their own time on the device, then on the CPU)
and rank<r>_trace.json (open it in https://ui.perfetto.dev or chrome://tracing to see the gaps where
the GPU waits for the CPU).
"""

from __future__ import annotations

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
