"""The same FSDP loop with LoRA adapters. (The 2-rank fine-tune of the real SmolLM2-135M-Instruct from its GGUF
is notebooks/09, executed by nbval in the same suite.)"""

from __future__ import annotations

import pytest

from recipes_core.checkpoint import read_metadata, find_latest, is_complete, load_train_params
from test_finetune import losses, run_in_process

TINY_RUN = ["data.max_seq_len=96", "data.max_train_examples=64", "data.max_eval_examples=8",
            "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.warmup_steps=0", "log.progress_bar=false"]


@pytest.mark.slow
def test_lora_trains_and_saves_only_the_adapters(tiny_models, tmp_path):
    """LoRA r=8 on q/k/v/o of the 4-layer tiny model: 4 layers x (q 8x(128+128) + k 8x(128+64) +
    v 8x(128+64) + o 8x(128+128)) = 28,672 trainable parameters; the base weights stay frozen."""
    out = tmp_path / "lora"
    lora = ["model.source=hf", f"model.path={tiny_models['instruct']}", "lora.enabled=true", "lora.r=8",
            "train.lr=5e-3", "train.max_steps=6", "checkpoint.keep_last_n=1", *TINY_RUN]
    first = run_in_process(out, lora + ["train.stop_after_steps=3"])
    assert first["n_trainable"] == 28_672 and first["n_params"] > 30 * first["n_trainable"]
    assert (out / "latest").read_text().strip() == "step_3"
    second = run_in_process(out, lora + ["checkpoint.resume=auto"])
    assert second["step"] == 6
    train = losses(out)
    assert train[6] < train[1], train

    ckpt = find_latest(out)
    assert ckpt.name == "step_6" and is_complete(ckpt)
    assert [p.name for p in out.glob("step_*")] == ["step_6"]  # keep_last_n=1 pruned step_3
    model_keys = [k for k in read_metadata(ckpt).state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys
    assert "model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in model_keys
    assert len(model_keys) == 4 * 4 * 2
    params = load_train_params(ckpt)
    assert params["lora"]["r"] == 8 and params["lora"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # The optimizer holds state for the adapters only (exp_avg, exp_avg_sq, step per adapter tensor).
    optim_keys = [k for k in read_metadata(ckpt).state_dict_metadata if k.startswith("optim.state.")]
    assert optim_keys and all("lora_" in k for k in optim_keys)


