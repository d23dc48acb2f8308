"""LoRA through peft, under the same FSDP loop: the base weights are frozen and sharded like any other,
only the small adapter matrices (lora_A, lora_B) train, reach the optimizer and are saved.

Order matters: the adapters are added before fully_shard (FSDP shards what the module holds when it is
wrapped), on every rank the same way. The initial weights then come from two places (weight_sources): the
base weights from the model's files, the adapters' from initial_adapter_weights.
"""

from __future__ import annotations

import torch
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


def initial_adapter_weights(model_config: dict, settings: LoraSettings, seed: int) -> dict[str, torch.Tensor]:
    """The adapters' initial values (peft's names), the same as get_peft_model gives a full model after
    torch.manual_seed(seed). peft draws them on the CPU in module order whatever the base weights hold, so a
    skeleton whose base weights are allocated but never written (to_empty: untouched pages take no memory)
    gives them without reading the model."""
    from recipes_core.models import build_model_from_config

    skeleton = build_model_from_config(model_config, device="meta").to_empty(device="cpu")
    torch.manual_seed(seed)
    peft_model = add_lora(skeleton, settings)
    return {name: p.detach().clone() for name, p in peft_model.named_parameters() if ".lora_" in name}


def weight_sources(names, base_weights: dict, adapters: dict) -> dict:
    """peft's state-dict names -> their initial values: an adapter's from `adapters`, a base weight from
    `base_weights` under its plain name (peft's without "base_model.model." and ".base_layer")."""
    sources = {}
    for name in names:
        base = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        source = adapters[name] if name in adapters else base_weights.get(base)
        if source is not None:
            sources[name] = source
    return sources
