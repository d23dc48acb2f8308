"""Model sources: meta-device builds, rotary buffers after to_empty, the tiny cache, GGUF -> HF folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from recipes_core.models import (build_model_from_config, ensure_tiny, gguf_to_hf, load_full_model,
                                 load_model_and_tokenizer, load_model_config, reset_rotary_buffers,
                                 resolve_model_source)

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_GGUF = REPO / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_meta_build_allocates_nothing_and_names_like_hugging_face(tiny_models):
    config = load_model_config(tiny_models["instruct"])
    meta = build_model_from_config(config, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    reference = load_full_model(tiny_models["instruct"])
    assert list(meta.state_dict()) == list(reference.state_dict())
    assert "lm_head.weight" in meta.state_dict() and "model.layers.0.self_attn.q_proj.weight" in meta.state_dict()


def test_meta_build_filled_later_computes_what_the_loaded_model_computes(tiny_models):
    """The trainer's path: meta build, to_empty, weights copied in, rotary inv_freq recomputed (it is in
    no state dict, so without reset_rotary_buffers it would be uninitialised memory)."""
    reference = load_full_model(tiny_models["instruct"]).eval()
    model = build_model_from_config(load_model_config(tiny_models["instruct"]), device="meta")
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    reset_rotary_buffers(model, "cpu")
    model.eval()
    ids = torch.tensor([[940, 5, 17, 300, 41, 99]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)


def test_tiny_source_is_built_once(tmp_path):
    first = resolve_model_source("tiny", str(tmp_path / "tiny"))
    stamp = (Path(first["hf_dir"]) / "model.safetensors").stat().st_mtime_ns
    second = resolve_model_source("tiny", str(tmp_path / "tiny"), tiny_variant="base")
    assert Path(second["hf_dir"]).name == "base" and second["kind"] == "tiny"
    assert (Path(first["hf_dir"]) / "model.safetensors").stat().st_mtime_ns == stamp
    assert set(ensure_tiny(tmp_path / "tiny")) == {"base", "instruct"}


def test_unknown_or_missing_sources_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_source("hf", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make smollm2"):
        gguf_to_hf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="tiny, hf, hub or gguf"):
        resolve_model_source("s3", "bucket")


@pytest.fixture(scope="module")
def smollm2_hf() -> Path:
    if not SMOLLM2_GGUF.exists():
        pytest.fail(f"{SMOLLM2_GGUF} is missing; run `make smollm2`")
    return gguf_to_hf(SMOLLM2_GGUF)  # ~60 s the first time, then reused


def test_gguf_becomes_a_plain_hugging_face_folder_once(smollm2_hf):
    start = time.perf_counter()
    assert gguf_to_hf(SMOLLM2_GGUF) == smollm2_hf
    assert time.perf_counter() - start < 2, "the converted folder must be reused, not rebuilt"
    names = {p.name for p in smollm2_hf.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    config = json.loads((smollm2_hf / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576


def test_converted_smollm2_loads_with_its_chat_template(smollm2_hf):
    model, tokenizer = load_model_and_tokenizer({"kind": "gguf", "path": str(SMOLLM2_GGUF), "hf_dir": str(smollm2_hf)})
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"


def test_a_hub_source_resolves_to_its_folder_in_the_hugging_face_cache(tiny_models, tmp_path, monkeypatch):
    """model.source=hub ends as a local folder of safetensors too (so each rank reads its own rows of it):
    the snapshot folder of the Hugging Face cache, found without the network. The cache is laid out as
    huggingface_hub writes it (refs/main names the snapshot); a repo without safetensors stays a name."""
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, keep in (("acme--tiny", "*"), ("acme--bin-only", "*.json")):
        (tmp_path / f"models--{repo}" / "refs").mkdir(parents=True)
        (tmp_path / f"models--{repo}" / "refs" / "main").write_text(commit)
        shutil.copytree(tiny_models["instruct"], tmp_path / f"models--{repo}" / "snapshots" / commit,
                        ignore=lambda folder, names: [n for n in names if not Path(n).match(keep)])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = resolve_model_source("hub", "acme/tiny")
    assert source["hf_dir"] == str(tmp_path / "models--acme--tiny" / "snapshots" / commit)
    assert source["path"] == "acme/tiny" and (Path(source["hf_dir"]) / "model.safetensors").is_file()
    assert resolve_model_source("hub", "acme/bin-only")["hf_dir"] == "acme/bin-only"
