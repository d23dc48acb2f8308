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
