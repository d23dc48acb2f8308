"""Sharded loading (recipes_core.distributed.load_sharded_weights): each of 2 torchrun ranks reads only its
own rows of the safetensors files, and ends with exactly the weights of the rank-0 broadcast it replaced
(where the broadcast remains, *.bin weights, with from_pretrained's in one process): tied and untied embeddings, a bf16 file into fp32 parameters, rows
that do not split evenly, HSDP's 2-D mesh, LoRA adapters, and the broadcast fallback for *.bin weights.
(Rank 0's memory while loading is measured by benchmarks/load_memory.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from recipes_core.launch import run_script
from recipes_core.tiny import tiny_llama_config


def test_sharded_load_equals_the_rank0_broadcast_bit_for_bit(tiny_models, tmp_path):
    # Tied embeddings, stored in bf16 (training is fp32), 301 x 136 embedding rows: 151 + 150 across 2 ranks.
    torch.manual_seed(0)
    tied = LlamaForCausalLM(tiny_llama_config(vocab_size=301, hidden_size=136, intermediate_size=350,
                                              tie_word_embeddings=True)).to(torch.bfloat16)
    tied.save_pretrained(tmp_path / "tied_bf16")
    assert "lm_head.weight" not in load_file(tmp_path / "tied_bf16" / "model.safetensors")  # one copy of a tied weight
    # The same model with its weights in pytorch_model.bin: no safetensors, so rank 0 loads and broadcasts.
    (tmp_path / "bin").mkdir()
    tied.config.save_pretrained(tmp_path / "bin")
    torch.save(tied.state_dict(), tmp_path / "bin" / "pytorch_model.bin")

    untied = str(tiny_models["instruct"])
    cases = {"untied": untied,
             "tied_bf16": f"{tmp_path / 'tied_bf16'}",
             "hsdp": f"{tmp_path / 'tied_bf16'},fsdp.sharding=hybrid,fsdp.replicate_degree=2",
             "lora": f"{untied},lora.enabled=true,lora.r=4",
             "bin": f"{tmp_path / 'bin'}"}
    out = tmp_path / "report.json"
    result = run_script(Path(__file__).with_name("load_ranks.py"), [str(out), *(f"{k}={v}" for k, v in cases.items())],
               nproc=2, log=tmp_path / "log.txt")
    report = json.loads(out.read_text())
    log = result.stdout  # which way each case loaded (rank 0 says it)
    assert log.count("loading weights: each rank reads its own rows") == 4, log  # all but bin
    assert log.count("loading weights: rank 0 reads the whole model and broadcasts it (from_rank0=True)") == 4, log
    assert log.count("/bin has no safetensors tensor named model.embed_tokens.weight)") == 1, log
    for name, ranks in report.items():
        for rank, r in enumerate(ranks):
            assert r["names"] and r["n"] > 0, (name, rank, r)
            assert r["shards_differ"] == [] and r["buffers_differ"] == [], (name, rank, r)
            assert r["not_fp32"] == [], (name, rank, r)
            assert r["tied"] == (name in ("tied_bf16", "hsdp", "bin")), (name, rank, r)
    assert [r["embed_rows"] for r in report["tied_bf16"]] == [151, 150]
    assert [r["embed_rows"] for r in report["hsdp"]] == [301, 301]  # 2 replicas x 1 shard
    assert "Replicate" in report["hsdp"][0]["placements"]
    assert report["lora"][0]["n"] > report["untied"][0]["n"]  # the adapters were compared too
