"""LoRA through peft, under the same FSDP loop: the base weights are frozen and sharded like any other,
only the small adapter matrices (lora_A, lora_B) train, reach the optimizer and are saved.

Order matters: the adapters are added before fully_shard (FSDP shards what the module holds when it is
wrapped), on every rank the same way, so the meta-built model and rank 0's full reference model have the
same parameter names for the broadcast of the initial weights.
"""

from __future__ import annotations

from torch import nn

from recipes_core.config import LoraConfig as LoraSettings


def peft_lora_config(settings: LoraSettings):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.r, lora_alpha=settings.alpha,
                      lora_dropout=settings.dropout, target_modules=list(settings.target_modules), bias="none")


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(settings))


def lora_fields(settings: LoraSettings) -> dict | None:
    """The peft LoraConfig fields that rebuild the adapter (for train_params.yaml), or None."""
    if not settings.enabled:
        return None
    config = peft_lora_config(settings)
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": sorted(config.target_modules), "bias": config.bias, "task_type": "CAUSAL_LM"}
