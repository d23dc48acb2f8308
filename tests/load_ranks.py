"""Run by tests/test_sharded_load.py under torchrun (2 ranks): the recipe's sharded load
(finetune.build_sharded_model, each rank reading its own rows of the safetensors files) fills every shard
bit for bit as the rank-0 broadcast did. A folder without safetensors ("bin" in its case name) takes the
broadcast itself, so there the gathered tensors are compared with the model from_pretrained loads in one
process. Arguments: the JSON report rank 0 writes, then name=folder[,override...] cases."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from recipes_core import distributed as D
from recipes_core.config import load_config
from recipes_core.finetune import build_sharded_model
from recipes_core.models import load_full_model, load_model_config


def bits(tensor: torch.Tensor) -> torch.Tensor:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.detach().float().view(torch.int32)  # bit patterns: -0.0 differs from 0.0, NaN from NaN


def check(env, name: str, hf_dir: str, overrides: list[str]) -> dict:
    cfg = load_config("cookbook/tiny_full.yaml", ["model.source=hf", f"model.path={hf_dir}", *overrides])
    model_config = load_model_config(hf_dir)
    sharded = build_sharded_model(cfg, env, hf_dir, model_config)[0]
    tensors = D.state_tensors(sharded)
    if "bin" in name:  # loaded by the broadcast: compare with one process's model (tiny: every rank can afford it)
        reference = load_full_model(hf_dir)
        full = reference.state_dict()  # the same on every rank: each takes its own part, nothing is sent
        expected = {n: distribute_tensor(full[n], t.device_mesh, t.placements, src_data_rank=None)
                    for n, t in tensors.items()}
    else:
        reference = build_sharded_model(cfg, env, hf_dir, model_config, from_rank0=True)[0]  # the old way
        expected = D.state_tensors(reference)
    base = sharded.get_base_model() if cfg.lora.enabled else sharded
    buffers = dict(reference.named_buffers())
    return {
        "names": sorted(tensors) == sorted(expected),
        "n": len(tensors),
        "not_fp32": [n for n, t in tensors.items() if t.dtype != torch.float32],
        "shards_differ": [n for n, t in tensors.items() if not torch.equal(bits(t), bits(expected[n]))],
        "buffers_differ": [n for n, b in sharded.named_buffers() if not torch.equal(b, buffers[n])],
        "tied": base.lm_head.weight is base.model.embed_tokens.weight,
        "embed_rows": base.model.embed_tokens.weight.to_local().shape[0],
        "placements": str(base.model.embed_tokens.weight.placements),
    }


def main(env: D.DistEnv, out: str, cases: list[str]) -> None:
    report = {}
    for case in cases:
        name, spec = case.split("=", 1)
        hf_dir, *overrides = spec.split(",")
        result = check(env, name, hf_dir, overrides)
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, result)
        report[name] = gathered
    if env.is_main:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    with D.process_group("gloo") as env:
        main(env, sys.argv[1], sys.argv[2:])
