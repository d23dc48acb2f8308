"""The CUDA path on a real GPU: nccl, FSDP2 bf16 mixed precision, CPU offload, exact resume, conversion
and generation on the GPU.

CI has no GPU, so this module is skipped there. Run it on any machine with one:
    python -m pytest tests/test_cuda.py -v
Runs (module-scoped, one rank on GPU 0, the tiny model built wider as in test_finetune):
  bf16       12 steps, bf16 compute (the CUDA default), deterministic kernels, checkpoints at 6 and 12
  resumed    a new process resuming bf16's step_6, steps 7..12
  fp32       the same 12 steps with fsdp.mixed_precision=fp32
  offload    bf16 with fsdp.cpu_offload=true and activation checkpointing
  activations bf16 with fsdp.activation_offload=true (saved activations in pinned host memory)
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from test_finetune import COMMON, REPO, launch, losses

from recipes_core.launch import launch_command
from recipes_core.metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

STEPS, HALF = 12, 6


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory) -> dict:
    from recipes_core.tiny import build_tiny

    model_dir = build_tiny(tmp_path_factory.mktemp("wide_tiny"), hidden_size=256, intermediate_size=704)["instruct"]
    root = tmp_path_factory.mktemp("cuda")
    base = COMMON + ["model.source=hf", f"model.path={model_dir}", "train.micro_batch_size=4",
                     "train.grad_accum_steps=1", "train.deterministic=true"]
    paths = {name: root / name for name in ("bf16", "resumed", "fp32", "offload", "activations")}
    stdout = {"bf16": launch(1, paths["bf16"], base + ["checkpoint.save_every=6", "train.eval_every=6"]).stdout}
    stdout["resumed"] = launch(1, paths["resumed"], base + [f"checkpoint.resume={paths['bf16'] / f'step_{HALF}'}"]).stdout
    launch(1, paths["fp32"], base + ["fsdp.mixed_precision=fp32", "checkpoint.save_final=false"])
    launch(1, paths["offload"], base + ["fsdp.cpu_offload=true", "fsdp.activation_checkpointing=true",
                                        "checkpoint.save_final=false"])
    launch(1, paths["activations"], base + ["fsdp.activation_offload=true", "checkpoint.save_final=false"])
    return {"paths": paths, "stdout": stdout, "model_dir": model_dir}


def test_nccl_bf16_run_trains_and_reports_gpu_metrics(gpu_runs):
    out = gpu_runs["paths"]["bf16"]
    assert "nccl" in gpu_runs["stdout"]["bf16"] and "cuda:0" in gpu_runs["stdout"]["bf16"]
    start = read_metrics(out / "metrics.jsonl", "start")[0]
    assert start["precision"] == "bf16"
    train = losses(out)
    assert sorted(train) == list(range(1, STEPS + 1))
    assert sum(train[s] for s in (10, 11, 12)) / 3 < sum(train[s] for s in (1, 2, 3)) / 3 - 0.5, train
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    last = read_metrics(out / "metrics.jsonl", "train")[-1]
    assert 0 < last["mfu"] < 1
    assert 0 < last["peak_memory_bytes_per_rank"][0] < torch.cuda.get_device_properties(0).total_memory


def test_resume_on_cuda_is_exact(gpu_runs):
    assert f"at step {HALF}" in gpu_runs["stdout"]["resumed"]
    straight, resumed = losses(gpu_runs["paths"]["bf16"]), losses(gpu_runs["paths"]["resumed"])
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1))
    assert all(resumed[s] == straight[s] for s in resumed), (straight, resumed)


def test_bf16_follows_fp32_and_offload_follows_bf16(gpu_runs):
    bf16, fp32, offload = (losses(gpu_runs["paths"][k]) for k in ("bf16", "fp32", "offload"))
    # bf16 rounds the compute, not the fp32 master weights: the curves stay close, not equal.
    assert max(abs(bf16[s] - fp32[s]) / fp32[s] for s in fp32) < 0.05, (bf16, fp32)
    assert bf16 != fp32
    # Offload moves parameters, gradients and AdamW to CPU (the CPU AdamW kernel rounds differently from
    # the CUDA one, and the bf16 copy of the weights magnifies that); activation checkpointing recomputes in
    # backward. Neither may change the run by more than bf16 rounding: an H100 run gave 6e-4 relative.
    assert offload[1] == bf16[1]  # the first step runs on identical weights
    assert max(abs(offload[s] - bf16[s]) / bf16[s] for s in bf16) < 5e-3, (offload, bf16)


def test_activation_offload_changes_no_number_and_lowers_gpu_memory(gpu_runs):
    # save_on_cpu copies the saved tensors to the host and back, bit for bit: the same run, other memory
    bf16, offloaded = (losses(gpu_runs["paths"][k]) for k in ("bf16", "activations"))
    assert offloaded == bf16
    peak = {k: read_metrics(gpu_runs["paths"][k] / "metrics.jsonl", "train")[-1]["peak_memory_bytes_per_rank"][0]
            for k in ("bf16", "activations")}
    assert peak["activations"] < peak["bf16"], peak


def test_gpu_checkpoint_converts_and_generates_on_gpu(gpu_runs, tmp_path):
    from recipes_core.convert import convert
    from recipes_core.infer import generate, load_for_inference

    result = convert(gpu_runs["paths"]["bf16"] / f"step_{STEPS}", tmp_path / "hf", verify=True)
    assert result.max_abs_diff == 0.0
    model, tokenizer = load_for_inference(tmp_path / "hf", dtype=torch.bfloat16)
    model.to("cuda")
    prompts = ["Give the first item of the list: pear, fig, plum", "Count the words: red blue green"]
    answers = generate(model, tokenizer, prompts, max_new_tokens=12)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert not any(p in a for p, a in zip(prompts, answers))
    # The same folder in bf16 on the GPU and fp32 on the CPU: the same next-token choice on a prompt.
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=False)
    with torch.no_grad():
        gpu_logits = model(input_ids=ids.to("cuda")).logits.float().cpu()
        cpu_model, _ = load_for_inference(tmp_path / "hf", dtype=torch.float32)
        cpu_logits = cpu_model(input_ids=ids).logits
    assert (gpu_logits - cpu_logits).abs().max() < 0.1 * cpu_logits.abs().max()


@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="checks the one-GPU message")
def test_more_ranks_than_gpus_is_a_clear_error(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--config", str(REPO / "cookbook" / "tiny_full.yaml"), f"checkpoint.output_dir={tmp_path}",
            "train.max_steps=1"]
    proc = subprocess.run(launch_command(2, args=args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "LOCAL_RANK 1 has no GPU: 1 visible" in proc.stderr + proc.stdout
