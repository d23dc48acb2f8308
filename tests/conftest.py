"""Shared fixtures: the tiny models are built once per test session into a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "cookbook" / "data"
SMOLLM2_GGUF = Path(os.environ.get("SMOLLM2_GGUF", REPO / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{"base": folder, "instruct": folder} of the tiny Llama-3-style models."""
    from recipes_core.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), DATA_DIR)


@pytest.fixture(scope="session")
def base_tokenizer(tiny_models):
    from recipes_core.tokens import load_tokenizer

    return load_tokenizer(tiny_models["base"])


@pytest.fixture(scope="session")
def instruct_tokenizer(tiny_models):
    from recipes_core.tokens import load_tokenizer

    return load_tokenizer(tiny_models["instruct"])


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer and ChatML template, read from its GGUF file."""
    if not SMOLLM2_GGUF.exists():
        pytest.fail(f"{SMOLLM2_GGUF} is missing; run `make smollm2`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name)


QUICKSTART_TEST_STEPS = 60  # fewer than `make quickstart`'s 100; still well above the untrained accuracy


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> dict:
    """One real quickstart run (torchrun FSDP fine-tune on 2 ranks, convert, verify, score), shared by
    the quickstart, conversion, inference, echo and doctor tests. Returns its summary.json."""
    from recipes_core.quickstart import run

    out = tmp_path_factory.mktemp("quickstart")
    return run(out / "run", out / "data", steps=QUICKSTART_TEST_STEPS, eval_prompts=100)


def write_checkpoint(model, out_dir: Path, tokenizer_dir: Path, step: int = 1, optimizer=None,
                     lora_fields: dict | None = None, model_source: dict | None = None) -> Path:
    """A checkpoint in recipes_core.finetune's format, saved by one process (no process group):
    <out_dir>/step_<step>/{.metadata, __0_0.distcp, train_params.yaml} and <out_dir>/latest."""
    import warnings

    import torch.distributed.checkpoint as dcp
    import yaml

    ckpt = Path(out_dir) / f"step_{step}"
    if lora_fields:
        from peft import get_peft_model_state_dict

        state = {"model": dict(get_peft_model_state_dict(model))}
        model_config = model.base_model.model.config.to_dict()
    else:
        state = {"model": model.state_dict()}
        model_config = model.config.to_dict()
    if optimizer is not None:
        state.update(optim=optimizer.state_dict(), scheduler={"last_epoch": step},
                     trainer={"step": step, "epoch": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(ckpt))
    source = model_source or {"kind": "hf", "path": str(tokenizer_dir), "hf_dir": str(tokenizer_dir)}
    params = {"config": {}, "model_source": source, "model_config": model_config, "tokenizer": str(tokenizer_dir),
              "step": step, "save_optimizer": optimizer is not None, "lora": lora_fields, "world_size": 1,
              "param_dtype": "fp32"}
    (ckpt / "train_params.yaml").write_text(yaml.safe_dump(params))
    (Path(out_dir) / "latest").write_text(ckpt.name)
    return ckpt


def exit_code(main, argv: list[str]) -> int:
    """The status a command's main(argv) ends with: its return value, or the code of the SystemExit that
    recipes_core.errors.command raises on bad input (one `error:` line, exit 2)."""
    try:
        return main(argv) or 0
    except SystemExit as stop:
        return stop.code
