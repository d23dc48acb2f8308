"""The FSDP training loop under real torchrun processes: losses fall, checkpoints, exact resume, one rank
against two, gradient accumulation, checkpoint sizes.

The runs are shared between assertions (module-scoped fixtures) to keep the suite fast on two cores
(each torchrun launch costs ~25 s of imports and start-up there):
  straight   torchrun, 2 ranks, 12 steps, checkpoints at 6 and 12 (with optimizer)
  resumed    torchrun, 2 ranks, a new process resuming from straight's step_6, runs steps 7..12
             (with fsdp.reshard_after_forward=false, which must not move the numbers either)
  one_rank   1 rank in this process (the plain-process path), micro-batch 4 (= 2 ranks x 2), model only,
             train.deterministic on
  accum      1 rank in this process, 2 micro-batches of 2 per step, activation checkpointing and the
             progress bar on
The model is the tiny Llama built a bit wider (hidden 256) so that each tensor is large next to the
~1.5 KB that DCP's torch.save framing adds per tensor; real models make that overhead negligible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recipes_core.checkpoint import find_latest, is_complete, load_train_params, measured_sizes, size_report
from recipes_core.launch import launch_command
from recipes_core.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
STEPS, HALF = 12, 6

# Chat data: supervised lengths differ between examples (2 to 4 tokens here), sequence lengths 25-84,
# so a mean of per-batch means would not equal the per-token mean and the equality tests can fail.
COMMON = ["data.format=chat", "data.train_path=cookbook/data/chat_train.jsonl",
          "data.eval_path=cookbook/data/chat_eval.jsonl", "data.max_seq_len=96", "data.max_train_examples=64",
          "data.max_eval_examples=16",
          "train.lr=2e-3", "train.warmup_steps=2", "train.lr_schedule=cosine", f"train.max_steps={STEPS}",
          "train.max_grad_norm=1.0", "log.progress_bar=false", "train.seed=7"]


def launch(nproc: int, out: Path, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run recipes_core.finetune on nproc ranks (0 = one plain process); fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    args = ["--config", str(REPO / "cookbook" / "tiny_full.yaml"), *overrides, f"checkpoint.output_dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(launch_command(nproc, args=args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    print(f"{nproc} ranks, {time.perf_counter() - start:.1f} s: {' '.join(overrides)}")
    if proc.returncode != 0:
        pytest.fail(f"finetune failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_in_process(out: Path, overrides: list[str]) -> dict:
    """One rank in this process: the same FSDP code path as a plain `python -m recipes_core.finetune`,
    without paying the imports again. One thread, like the OMP_NUM_THREADS=1 subprocesses."""
    import torch

    from recipes_core.config import load_config
    from recipes_core.finetune import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_config(REPO / "cookbook" / "tiny_full.yaml", [*overrides, f"checkpoint.output_dir={out}"])
        return run(config)
    finally:
        torch.set_num_threads(threads)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl", "train")}


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory) -> Path:
    from recipes_core.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("wide_tiny"), hidden_size=256, intermediate_size=704)["instruct"]


@pytest.fixture(scope="module")
def runs(wide_tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    model = ["model.source=hf", f"model.path={wide_tiny}"]
    two_rank = COMMON + model + ["train.micro_batch_size=2", "train.grad_accum_steps=1"]
    paths = {name: root / name for name in ("straight", "resumed", "one_rank", "accum")}
    launch(2, paths["straight"], two_rank + ["checkpoint.save_every=6", "train.eval_every=6"])
    mid_run = paths["straight"] / f"step_{HALF}"
    # fsdp.reshard_after_forward=false only changes when parameters are gathered, never the numbers:
    # the resumed run must still match the straight one bit for bit.
    proc = launch(2, paths["resumed"], two_rank + [f"checkpoint.resume={mid_run}", "fsdp.reshard_after_forward=false"])
    assert f"resumed from {mid_run} at step {HALF}" in proc.stdout
    single = COMMON + model + ["checkpoint.save_optimizer=false"]
    # train.deterministic only turns on checks here (CPU kernels already are): the numbers must not move.
    run_in_process(paths["one_rank"], single + ["train.micro_batch_size=4", "train.grad_accum_steps=1",
                                                "train.deterministic=true"])
    import torch

    assert not torch.are_deterministic_algorithms_enabled()  # run() restores the process's setting
    # Activation checkpointing recomputes the same numbers in backward: it must not move the losses.
    run_in_process(paths["accum"], single + ["train.micro_batch_size=2", "train.grad_accum_steps=2",
                                             "fsdp.activation_checkpointing=true", "log.progress_bar=true"])
    return paths


@pytest.mark.slow
def test_two_ranks_training_and_eval_loss_fall(runs):
    train = losses(runs["straight"])
    assert sorted(train) == list(range(1, STEPS + 1))
    first, last = sum(train[s] for s in (1, 2, 3)) / 3, sum(train[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.5, train
    evals = read_metrics(runs["straight"] / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [HALF, STEPS]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(abs(e["eval_perplexity"] - 2.718281828 ** e["eval_loss"]) < 1e-6 * e["eval_perplexity"] for e in evals)
    record = read_metrics(runs["straight"] / "metrics.jsonl", "train")[-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "supervised_tokens_per_s", "mfu"):
        assert record[key] > 0, key
    assert len(record["peak_memory_bytes_per_rank"]) == 2 and min(record["peak_memory_bytes_per_rank"]) > 0
    assert 0 < record["mfu"] < 1


@pytest.mark.slow
def test_checkpoint_folders_follow_the_contract(runs):
    out = runs["straight"]
    assert (out / "latest").read_text().strip() == f"step_{STEPS}"
    assert find_latest(out) == out / f"step_{STEPS}"
    assert not list(out.glob(".tmp_step_*")), "temporary folders must be renamed when complete"
    for step in (HALF, STEPS):
        folder = out / f"step_{step}"
        names = {p.name for p in folder.iterdir()}
        assert ".metadata" in names and "train_params.yaml" in names
        assert {"__0_0.distcp", "__1_0.distcp"} <= names, names
        assert {"rng_rank0.pt", "rng_rank1.pt"} <= names
        assert is_complete(folder)
        params = load_train_params(folder)
        for key in ("config", "model_source", "model_config", "tokenizer", "step", "save_optimizer", "lora",
                    "world_size", "param_dtype"):
            assert key in params, key
        assert params["step"] == step and params["world_size"] == 2 and params["save_optimizer"] is True
        assert params["model_source"]["kind"] == "hf" and params["lora"] is None
        assert (Path(params["tokenizer"]) / "tokenizer.json").exists()
        keys = set(measured_sizes(folder)) - {"files_on_disk"}
        assert keys == {"model", "optim", "scheduler", "trainer"}
    # The model keys are the plain Hugging Face names, each saved once.
    from recipes_core.checkpoint import read_metadata

    fqns = [k for k in read_metadata(out / f"step_{STEPS}").state_dict_metadata if k.startswith("model.")]
    assert "model.model.layers.0.self_attn.q_proj.weight" in fqns and "model.lm_head.weight" in fqns
    assert not [k for k in fqns if "_fsdp" in k or "_orig_mod" in k]
    # Model-only checkpoints: no optimizer, scheduler, trainer state or RNG files.
    only = find_latest(runs["one_rank"])
    assert set(measured_sizes(only)) - {"files_on_disk"} == {"model"}
    assert not list(only.glob("rng_rank*.pt"))


@pytest.mark.slow
def test_resume_continues_exactly(runs):
    """A fresh process restores model, optimizer, scheduler, data position and RNG from step 6 and
    continues: the losses of steps 7..12 are bit for bit those of the uninterrupted run."""
    straight, resumed = losses(runs["straight"]), losses(runs["resumed"])
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1))
    for step in range(HALF + 1, STEPS + 1):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])


@pytest.mark.slow
def test_one_rank_equals_two_ranks_with_the_same_global_batch(runs):
    one, two = losses(runs["one_rank"]), losses(runs["straight"])
    diffs = [abs(one[s] - two[s]) for s in range(1, STEPS + 1)]
    print("max |1 rank - 2 ranks| loss difference:", max(diffs))
    assert max(diffs) < 1e-4


@pytest.mark.slow
def test_gradient_accumulation_equals_a_double_batch(runs):
    double, accum = losses(runs["one_rank"]), losses(runs["accum"])
    diffs = [abs(double[s] - accum[s]) for s in range(1, STEPS + 1)]
    print("max |accum 2x2 - batch 4| loss difference:", max(diffs))
    assert max(diffs) < 1e-5



def test_gather_once_per_step_trains_the_same_numbers_with_fewer_collectives(tmp_path):
    """fsdp.gather_once_per_step on 2 real ranks, accumulation 2: bit-identical losses, gradient norms and
    weights (the same gathered values, the same gradients summed in the same order, one reduce-scatter
    either way), and each layer all-gathered once per step instead of twice per micro-batch."""
    from recipes_core.launch import run_script

    out = tmp_path / "comm.json"
    run_script(Path(__file__).with_name("comm_ranks.py"), [str(out)], nproc=2, log=tmp_path / "log.txt")
    result = json.loads(out.read_text())
    off, on = result["off"], result["on"]
    assert on["losses"] == off["losses"] and on["grad_norms"] == off["grad_norms"], (off, on)
    assert on["weights_sum"] == off["weights_sum"] and on["weights"] == off["weights"]
    assert off["losses"][-1] < off["losses"][0]  # it trained
    units, accum = off["layers"] + 1, 2  # 4 decoder layers and the root (embeddings, norm, lm_head)
    # off: every micro-batch gathers each unit in forward and again in backward, except the last layer
    # (kept from forward to backward) and the root (never resharded after forward)
    assert off["calls"] == {"all_gather": accum * (units + units - 2), "reduce_scatter": units, "all_reduce": 3}
    assert on["calls"] == {"all_gather": units, "reduce_scatter": units, "all_reduce": 3}
    # fsdp.reduce_every_micro_batch: a reduce-scatter per micro-batch (no unsharded gradients kept between them),
    # the same sum in another order
    every = result["reduce_every"]
    assert every["calls"] == {**off["calls"], "reduce_scatter": accum * units}
    assert every["losses"] == pytest.approx(off["losses"], rel=1e-6)
    assert every["grad_norms"] == pytest.approx(off["grad_norms"], rel=1e-5)


def test_chat_examples_have_different_supervised_lengths(wide_tiny):
    """What makes the accumulation test able to fail: with equal lengths a mean of means is right too."""
    from recipes_core.data import load_records
    from recipes_core.finetune import supervised_tokens
    from recipes_core.collate import pad_collate
    from recipes_core.preprocess import tokenize_records
    from recipes_core.tokens import load_tokenizer

    tokenizer = load_tokenizer(wide_tiny)
    records = load_records(REPO / "cookbook" / "data" / "chat_train.jsonl", "chat").select(range(32))
    examples = tokenize_records(records, "chat", tokenizer, 96)
    counts = {supervised_tokens(pad_collate([e], tokenizer.pad_token_id)) for e in examples}
    assert len(counts) > 1, counts


@pytest.mark.slow
@pytest.mark.parametrize("run, per_param", [("one_rank", 4.0), ("straight", 12.0)])
def test_checkpoint_sizes_match_the_prediction(runs, run, per_param, capsys):
    from recipes_core.checkpoint import main

    report = size_report(find_latest(runs[run]))
    print(json.dumps(report, indent=1))
    assert abs(report["ratio_total"] - 1) < 0.02, report
    assert abs(report["bytes_per_param"] - per_param) < 0.02 * per_param, report
    assert main(["size", str(runs[run])]) == 0
    assert "bytes/param on disk" in capsys.readouterr().out


@pytest.mark.slow
def test_model_only_resume_warns_that_the_optimizer_starts_cold(runs, tmp_path):
    out = tmp_path / "cold"
    ckpt = find_latest(runs["one_rank"])
    with pytest.warns(UserWarning, match="optimizer starts cold"):
        run_in_process(out, COMMON + ["model.source=hf", f"model.path={load_train_params(ckpt)['model_source']['path']}",
                                      "train.max_steps=1", "train.micro_batch_size=2", "checkpoint.save_final=false",
                                      f"checkpoint.resume={ckpt}", "data.eval_path="])
    first = losses(out)[1]
    # The weights were restored: the first loss is the trained model's, far below the initial one.
    assert first < losses(runs["one_rank"])[1] - 0.5, first


def test_resolved_config_is_saved(runs):
    saved = yaml.safe_load((runs["straight"] / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == STEPS and saved["data"]["format"] == "chat"



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cmeel-mimalloc is a Linux dependency")
def test_the_launched_ranks_run_with_mimalloc(runs):
    """launch_command's launcher preloads mimalloc into every rank (recipes_core.launch.allocator_env); the
    rank records what its process has mapped. The in-process one-rank run stays on glibc."""
    assert read_metrics(runs["straight"] / "metrics.jsonl", "start")[0]["allocator"] == "mimalloc"

@pytest.mark.slow
def test_hybrid_sharding_on_a_2x2_mesh_matches_full_sharding(runs, wide_tiny, tmp_path):
    """HSDP on four CPU processes: shard within pairs, replicate across them. Same global batch (4) as
    the two-rank run, so the losses match it."""
    out = tmp_path / "hsdp"
    launch(4, out, COMMON + ["model.source=hf", f"model.path={wide_tiny}", "train.max_steps=4",
                             "train.micro_batch_size=1", "train.grad_accum_steps=1", "fsdp.sharding=hybrid", "fsdp.replicate_degree=2",
                             "data.eval_path=", "checkpoint.save_optimizer=false"], timeout=400)
    start = read_metrics(out / "metrics.jsonl", "start")[0]
    assert start["world_size"] == 4 and start["mesh"] == {"replicate": 2, "shard": 2}
    assert {"__0_0.distcp", "__3_0.distcp"} <= {p.name for p in (out / "step_4").iterdir()}
    hsdp, full = losses(out), losses(runs["straight"])
    # The schedule spans 4 steps here instead of 12, but the first 3 updates use the same learning rates
    # (2 warmup steps, then the start of the decay), and the loss of step 4 is taken before update 4.
    diffs = [abs(hsdp[s] - full[s]) for s in range(1, 5)]
    print("max |HSDP 2x2 - FSDP 2 ranks| loss difference:", max(diffs))
    assert max(diffs) < 1e-4, (hsdp, full)
    assert hsdp[4] < hsdp[1]


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux names threads in /proc/self/task/*/comm)."""
    names = [p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")]
    return sorted(n for n in names if "gloo" in n)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to list threads")
def test_teardown_frees_the_process_group(wide_tiny, tmp_path):
    """After run() the group is gone, threads included. If DTensor's caches kept it alive, it would be
    freed during interpreter shutdown instead, which now and then aborts a finished torchrun worker with
    "terminate called without an active exception" (seen once in CI, notebook 08)."""
    before = gloo_threads()
    run_in_process(tmp_path, COMMON + ["model.source=hf", f"model.path={wide_tiny}", "train.max_steps=2",
                                       "checkpoint.save_final=false", "train.eval_every=0"])
    assert gloo_threads() == before, "gloo threads outlived destroy_process_group (see distributed.teardown)"


SCRIPT_WITH_A_LIVE_MODEL = '''
import os, sys, torch
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
from recipes_core.distributed import process_group

def gloo_threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{task}/comm").read().strip())
        except OSError:
            pass
    return [n for n in names if "gloo" in n]

with process_group() as env:  # module-level on purpose: the sharded model and optimizer outlive the block
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size - 8, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    inside = len(gloo_threads())
print(f"rank {env.rank}: gloo threads inside {inside}, after {len(gloo_threads())}", flush=True)
'''


@pytest.mark.slow
def test_process_group_frees_the_group_while_the_model_lives(tiny_models, tmp_path):
    """A raw FSDP2 script under torchrun (2 ranks) whose sharded model is still referenced after
    `with process_group()`: FSDP's mesh info and the device meshes hold the destroyed group, and only
    teardown dropping those references lets it go (and gloo's threads end) before interpreter shutdown."""
    from recipes_core.launch import run_script

    script = tmp_path / "probe.py"
    script.write_text(SCRIPT_WITH_A_LIVE_MODEL)
    result = run_script(script, [str(tiny_models["instruct"])], nproc=2, cwd=REPO)
    lines = sorted(line for line in result.stdout.splitlines() if "gloo threads" in line)
    assert len(lines) == 2, result.stdout + result.stderr
    for line in lines:
        inside, after = (int(n) for n in line.replace(",", "").split()[-3::2])
        assert inside > 0 and after == 0, line
    assert "still referenced" not in result.stderr, result.stderr[-2000:]
