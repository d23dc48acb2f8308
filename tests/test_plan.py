"""The memory planner (recipes_core.plan): its arithmetic against the models it describes and against
real fine-tunes on 1, 2 and 4 CPU ranks; its command's output and its bad-input errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import DATA_DIR, exit_code
from recipes_core import plan as P
from recipes_core.launch import run_script
from recipes_core.tiny import tiny_llama_config

# Hidden 512, 12 layers: ~40M parameters, so that the recipe's memory (160 MB of fp32 weights) stands well
# above what moves between processes by itself (a few MiB), also at 4 ranks.
MID = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4)
SEQ = 256


@pytest.mark.parametrize("name, billions", [("meta-llama/Llama-3.2-1B-Instruct", 1.236),
                                            ("llama-3.2-3b", 3.213), ("Llama-3.1-8B", 8.030),
                                            ("3.1-70b", 70.554), ("SmolLM2-135M-Instruct", 0.1349)])
def test_known_shapes_have_the_published_parameter_counts(name, billions):
    assert P.resolve_model(name)[1].params / 1e9 == pytest.approx(billions, abs=0.0006)


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_and_activations_match_a_built_model(tied):
    """Shape.params equals the model's numel; the activation formula is within 10% of the bytes autograd
    really keeps (counted with saved_tensors_hooks), with and without activation checkpointing."""
    config = tiny_llama_config(vocab_size=500, tie_word_embeddings=tied, hidden_size=256, intermediate_size=704,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    shape = P.Shape.from_config(config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 500, (1, 64))
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        storages = {}

        def pack(t):
            base = t._base if t._base is not None else t
            if not (base.is_leaf and base.requires_grad):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.model(input_ids=ids).last_hidden_state  # the body: the loss has its own row
        out.sum().backward()
        counted = sum(storages.values())
        predicted = P.activation_bytes(shape, 64, "fp32", checkpointing)
        if checkpointing:  # the formula adds the layer recomputed in backward, which the hooks do not see
            predicted -= P.activation_bytes(shape, 64, "fp32", False) // shape.layers
        assert predicted == pytest.approx(counted, rel=0.10), checkpointing


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory) -> Path:
    from recipes_core.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("mid"), DATA_DIR, **MID)["instruct"]


# 1 and 2 ranks in the test command (~10 s and ~20 s: sharding, gloo's collective copies and every rank, rank 0
# included); 4 ranks with RECIPES_PLAN_MEASURE=1 (4 processes on 2 cores: ~45 s, over the suite's budget). Measured / predicted on 2026-12-03, every
# rank, with the launcher's mimalloc (recipes_core.launch.allocator_env): 1.12 (1 rank), 1.11-1.12 (2 ranks),
# 1.09-1.11 (4 ranks); with RECIPES_ALLOCATOR=glibc (MALLOC_MMAP_THRESHOLD_=131072): 1.02-1.03 at each. Before, with the sum of
# every part and a baseline taken before the data pipeline's imports (~110 MiB): 0.98, 1.13, 1.29.
@pytest.mark.parametrize("ranks", [pytest.param(n, marks=pytest.mark.skipif(
    n == 4 and not os.environ.get("RECIPES_PLAN_MEASURE"), reason="4 ranks: RECIPES_PLAN_MEASURE=1"))
    for n in (1, 2, 4)])
def test_prediction_within_15_percent_of_measured_runs(ranks, mid_model, tmp_path):
    """Real torchrun fine-tunes (2 steps, micro-batch 1 x 256 packed tokens, fp32, gloo). Measured per rank:
    peak RSS (ru_maxrss, from the run's metrics.jsonl) minus the RSS the rank held just before the model was
    built (the runtime and data pipeline, which the planner leaves to --runtime-overhead). Predicted: the
    planner's device peak; for rank 0 the larger of that and its load-time memory (its shards and one tensor's rows)."""
    out = tmp_path / "memory.json"
    run_script(Path(__file__).with_name("plan_ranks.py"), [out, mid_model, tmp_path / "run", SEQ], nproc=ranks,
               log=tmp_path / "log.txt")
    measured = json.loads(out.read_text())
    shape = P.resolve_model(str(mid_model))[1]
    predicted = P.plan(shape, ranks, micro_batch=1, seq_len=SEQ, precision="fp32",
                       loss_chunk_size=measured["chunk"], device="cpu")
    ratios = []
    for rank in range(ranks):
        expected = max(predicted["device"], predicted["rank0_load"]) if rank == 0 else predicted["device"]
        got = measured["peak"][rank] - measured["baseline"][rank]
        ratios.append(got / expected)
        print(f"{ranks} rank(s), rank {rank}: measured {got / 2**20:.0f} MiB, predicted {expected / 2**20:.0f} MiB, "
              f"ratio {got / expected:.3f}")
    assert all(abs(r - 1) <= 0.15 for r in ratios), ratios


def test_command_prints_the_table_assumptions_and_verdict(capsys):
    assert exit_code(P.main, ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--world-size", "8",
                              "--gpu-memory", "80GiB", "--activation-checkpointing", "--chunked-loss"]) == 0
    out = capsys.readouterr().out
    for needle in ("8.030 B parameters", "optimizer (AdamW)", "activations", "loss/logits", "Assumptions:",
                   "offload on, chunk 1024", "fits"):
        assert needle in out
    assert exit_code(P.main, ["--model", "3.1-70b", "--world-size", "8", "--gpu-memory", "80GiB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--model", "no/such-model", "--world-size", "2"], "not a known shape"),
    (["--model", "3.2-1b", "--world-size", "0"], "--world-size"),
    (["--model", "3.2-1b", "--world-size", "2", "--gpu-memory", "lots"], "not a memory size"),
    (["--model", "3.2-1b", "--world-size", "2", "--precision", "fp8"], "--precision fp8"),
])
def test_bad_input_is_one_error_line(argv, needle, capsys):
    assert exit_code(P.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]


def test_folder_without_config_is_one_error_line(tmp_path, capsys):
    assert exit_code(P.main, ["--model", str(tmp_path), "--world-size", "2"]) == 2
    assert "no config.json" in capsys.readouterr().err


# recipe -> the hardware its header says it is sized for: (ranks, GPU memory)
REAL_SIZE_RECIPES = {"llama3_2_1b_full.yaml": ("meta-llama/Llama-3.2-1B-Instruct", 8),
                     "llama3_2_3b_full.yaml": ("meta-llama/Llama-3.2-3B-Instruct", 8),
                     "llama3_1_8b_full.yaml": ("meta-llama/Llama-3.1-8B-Instruct", 8),
                     "llama3_1_70b_full.yaml": ("meta-llama/Llama-3.1-70B-Instruct", 32)}


@pytest.mark.parametrize("recipe", sorted(REAL_SIZE_RECIPES))
def test_real_size_recipes_load_offline_and_fit_their_hardware(recipe):
    """Each recipe loads with load_config (nothing is downloaded: the hub name is only read at run time),
    names its model by hub name, trains in bf16 with activation checkpointing and chunked loss, and the
    planner puts its per-GPU memory (with 1 GiB of runtime) under the 80 GB its header names."""
    from recipes_core.config import load_config

    name, ranks = REAL_SIZE_RECIPES[recipe]
    path = DATA_DIR.parent / recipe
    cfg = load_config(path)
    assert (cfg.model.source, cfg.model.path) == ("hub", name)
    assert cfg.fsdp.mixed_precision == "bf16" and cfg.fsdp.activation_checkpointing and cfg.train.loss_chunk_size
    assert cfg.data.format == "chat" and f"--world-size {ranks} " in path.read_text()
    shape = P.resolve_model(name)[1]
    needed = P.plan(shape, ranks, cfg.train.micro_batch_size, cfg.data.max_seq_len, "bf16", True,
                    cfg.fsdp.cpu_offload, cfg.train.loss_chunk_size)["device"] + P.GiB
    assert needed <= 80e9, needed / P.GiB
