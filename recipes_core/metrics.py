"""What a training run reports: throughput, model FLOPs utilisation (MFU), peak memory, and a JSONL log.

MFU = model FLOPs actually done per second / peak FLOPs of the hardware. Model FLOPs per token follow the
PaLM paper's count: 6 x N (forward 2N, backward 4N) for the weight matmuls plus 12 x layers x hidden x
sequence length for attention scores. With LoRA the frozen weights still need input gradients but no
weight gradients, so they cost 4 x N_frozen. The peak is a known GPU figure (dense bf16) or, on CPU or an
unknown GPU, measured here with a short matmul benchmark, so MFU on a laptop is against that laptop.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

# Dense (no sparsity) peak FLOP/s per GPU from the vendors' data sheets, bf16 tensor cores.
KNOWN_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                       "L4": 121e12, "4090": 165e12}


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                      seconds: float = 0.3) -> float:
    """Measured FLOP/s of square matmuls on this device with this process's threads."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - start)


def peak_flops(device: torch.device, compute_dtype: str, configured: float = 0.0) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from)."""
    if configured > 0:
        return configured, "configured"
    if device.type == "cuda" and compute_dtype == "bf16":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name} data sheet (bf16 dense)"
    dtype = torch.bfloat16 if compute_dtype == "bf16" else torch.float32
    return matmul_peak_flops(device, dtype), f"measured {compute_dtype} matmul on {device.type}"


def flops_per_token(model_config: dict, n_params: int, n_trainable: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward). Input embedding lookups are not matmuls, so the
    embedding table is left out unless it is tied to the lm_head (then it is the lm_head matmul)."""
    vocab, hidden = model_config["vocab_size"], model_config["hidden_size"]
    embedding = 0 if model_config.get("tie_word_embeddings") else vocab * hidden
    n_matmul = n_params - embedding
    n_frozen = max(n_matmul - n_trainable, 0)
    weights = 6 * min(n_trainable, n_matmul) + 4 * n_frozen
    attention = 12 * model_config["num_hidden_layers"] * hidden * seq_len
    return weights + attention


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: allocated GPU memory on CUDA, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def current_memory_bytes(device: torch.device) -> int:
    """Memory this rank holds now: allocated GPU memory on CUDA, the process's RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as statm:  # Linux; resident pages are its second field
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MetricsLogger:
    """One JSON object per line in <output_dir>/metrics.jsonl (rank 0 only), mirrored to TensorBoard
    when the tensorboard package is installed, and to W&B (offline) / MLflow (local file store) when
    turned on (recipes_core.trackers)."""

    def __init__(self, path: str | Path, enabled: bool, tensorboard: bool = True, append: bool = False,
                 wandb: bool = False, mlflow: bool = False, experiment: str = "recipes_core",
                 run_config: dict | None = None):
        self.enabled = enabled
        self.path = Path(path)
        self.writer = None
        self.trackers = []
        if not enabled:
            return
        names = [name for name, on in (("wandb", wandb), ("mlflow", mlflow)) if on]
        if names:
            from recipes_core.trackers import open_trackers

            self.trackers = open_trackers(self.path.parent, names, experiment, run_config or {}, resume=append)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")  # append on resume
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: the JSONL file is the record
                pass
            else:
                self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
            for tracker in self.trackers:
                tracker.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl file, optionally only one kind ("train", "eval", "summary")."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
