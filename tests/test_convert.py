"""Checkpoint -> Hugging Face folder: round trips for several model shapes, optimizer state in the
checkpoint, bf16 sharded output, LoRA merge and adapter, and refusal of incomplete checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import exit_code, write_checkpoint
from transformers import AutoModelForCausalLM

from recipes_core.checkpoint import CheckpointError
from recipes_core.convert import convert, verify_conversion
from recipes_core.convert import main as convert_main
from recipes_core.tiny import tiny_llama_config


def _same_weights(converted, original) -> None:
    expected = original.state_dict()
    actual = converted.state_dict()
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor.to(actual[name].dtype)), name


def test_round_trip_grouped_query_attention(tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"])).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    write_checkpoint(model, tmp_path / "run", tiny_models["instruct"], step=7)

    result = convert(tmp_path / "run", tmp_path / "hf", verify=True)  # the run folder: `latest` names step_7
    assert result.step == 7 and result.max_abs_diff <= 1e-5
    converted = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    _same_weights(converted, model)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    eot, end_of_text = 944, 941  # <|eot_id|>, <|end_of_text|> in the tiny vocabulary
    assert {eot, end_of_text} <= set(generation["eos_token_id"])
    assert tokenizer_config["eos_token"] == "<|eot_id|>"
    assert (tmp_path / "hf" / "chat_template.jinja").read_text().startswith("{{ bos_token }}")


def test_round_trip_tied_embeddings(tiny_models, instruct_tokenizer, tmp_path):
    config = tiny_llama_config(len(instruct_tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    write_checkpoint(model, tmp_path / "run", tiny_models["instruct"])

    result = convert(tmp_path / "run" / "step_1", tmp_path / "hf", verify=True)
    assert result.max_abs_diff <= 1e-5
    converted = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    # One copy on disk: the checkpoint lists lm_head.weight too (state_dict names both), the folder must not.
    from safetensors import safe_open

    assert "lm_head.weight" in model.state_dict()
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    _same_weights(converted, model)


def test_round_trip_checkpoint_with_optimizer_state(tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.arange(2, 40).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    write_checkpoint(model.eval(), tmp_path / "run", tiny_models["instruct"], step=1, optimizer=optimizer)

    result = convert(tmp_path / "run", tmp_path / "hf", verify=True)
    assert result.max_abs_diff <= 1e-5
    _same_weights(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")), model)


def test_bf16_output_is_sharded_with_an_index(tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"])).eval()
    write_checkpoint(model, tmp_path / "run", tiny_models["instruct"])

    result = convert(tmp_path / "run", tmp_path / "hf", dtype="bf16", max_shard_size="300KB", verify=True)
    assert result.max_abs_diff <= 1e-5  # against the checkpoint's weights rounded to bf16
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "hf" / shard).is_file() for shard in shards)
    converted = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert converted.dtype == torch.bfloat16
    _same_weights(converted, model)


def _lora_model(tiny_models, fields):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"]))
    model = get_peft_model(base, LoraConfig(**fields))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a trained adapter is not
                parameter.normal_(0, 0.05)
    return model.eval()


def test_lora_merge_and_adapter(tiny_models, tmp_path):
    from peft import AutoPeftModelForCausalLM

    fields = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
              "task_type": "CAUSAL_LM"}
    model = _lora_model(tiny_models, fields)
    ckpt = write_checkpoint(model, tmp_path / "run", tiny_models["instruct"], lora_fields=fields)
    ids = torch.arange(3, 30).unsqueeze(0)
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    convert(ckpt, tmp_path / "merged")
    assert verify_conversion(tmp_path / "merged", ckpt) <= 1e-5  # against a fresh rebuild, unmerged
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in name for name in merged.state_dict())

    convert(ckpt, tmp_path / "adapter", lora="adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        for loaded in (merged, adapter):
            assert (loaded(input_ids=ids).logits - expected).abs().max() <= 1e-5


def test_incomplete_checkpoints_are_refused(tiny_models, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"])).eval()
    ckpt = write_checkpoint(model, tmp_path / "run", tiny_models["instruct"])
    shard = next(ckpt.glob("__*_*.distcp"))
    shard.rename(shard.with_suffix(".moved"))
    with pytest.raises(CheckpointError, match=shard.name):
        convert(ckpt, tmp_path / "hf")
    shard.with_suffix(".moved").rename(shard)

    (ckpt / ".metadata").rename(ckpt / "metadata.moved")
    with pytest.raises(SystemExit) as exit_info:  # bad input: one `error:` line, exit 2
        convert_main([str(ckpt), str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    assert ".metadata is missing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no half-written folder


def test_existing_output_is_kept_unless_overwrite(tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"])).eval()
    write_checkpoint(model, tmp_path / "run", tiny_models["instruct"])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        convert(tmp_path / "run", tmp_path / "hf")
    assert (tmp_path / "hf" / "mine.txt").is_file()
    convert(tmp_path / "run", tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "mine.txt").exists() and (tmp_path / "hf" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


def test_lora_checkpoint_written_by_finetune(tiny_models, tmp_path):
    """A real LoRA run of recipes_core.finetune (one rank, in this process): merged and adapter outputs."""
    from peft import AutoPeftModelForCausalLM
    from test_finetune import run_in_process

    run_in_process(tmp_path / "lora", ["model.source=hf", f"model.path={tiny_models['instruct']}", "lora.enabled=true",
                                       "lora.r=4", "train.lr=5e-3", "train.max_steps=2", "data.max_seq_len=64",
                                       "data.max_train_examples=16", "data.max_eval_examples=4",
                                       "train.micro_batch_size=4", "log.progress_bar=false", "log.tensorboard=false"])
    merged = convert(tmp_path / "lora", tmp_path / "merged", verify=True)
    assert merged.max_abs_diff <= 1e-5  # against the unmerged adapter rebuilt from the checkpoint
    adapter = convert(tmp_path / "lora", tmp_path / "adapter", lora="adapter", verify=True)
    assert adapter.max_abs_diff <= 1e-5
    ids = torch.arange(3, 30).unsqueeze(0)
    with torch.no_grad():
        via_peft = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))(input_ids=ids).logits
        via_merge = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"]))(input_ids=ids).logits
    assert (via_peft - via_merge).abs().max() <= 1e-5 and (via_merge - base).abs().max() > 1e-4  # it trained
    from recipes_core.infer import generate, load_for_inference

    answers = [generate(*load_for_inference(folder), ["Give the first item of the list.\nmango, wolf"], max_new_tokens=4)
               for folder in (tmp_path / "adapter", tmp_path / "merged", tmp_path / "lora")]
    assert answers[0] == answers[1] == answers[2]  # adapter folder, merged folder, checkpoint itself


# ----- no command replaces its own input ---------------------------------------------------------------

def _hashes(folder) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def two_step_run(tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"])).eval()
    run = tmp_path / "run"
    write_checkpoint(model, run, tiny_models["instruct"], step=1)
    write_checkpoint(model, run, tiny_models["instruct"], step=2)  # latest -> step_2
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (run / "config.yaml").write_text("train: {}\n")
    return run


@pytest.mark.parametrize("source, out, overwrite", [
    ("step_2", "step_2", True),        # the checkpoint itself
    ("", "", True),                    # the run folder: every checkpoint, metrics.jsonl, config.yaml
    ("step_2", "step_2/hf", False),    # inside the checkpoint
    ("step_2", "", True),              # contains the checkpoint
    ("", "step_2", True),              # the checkpoint `latest` names
    ("step_2", "step_1", True),        # another checkpoint of the run
    ("step_2", "latest", True),        # a file the run wrote
    ("step_2", "step_1/../step_2", True),
])
def test_convert_never_replaces_its_source(two_step_run, source, out, overwrite, capsys):
    run = two_step_run
    before = _hashes(run)
    args = [str(run / source), str(run / out)] + (["--overwrite"] if overwrite else [])
    assert exit_code(convert_main, args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert _hashes(run) == before, "the source changed"


def test_convert_into_a_new_folder_of_the_run_is_allowed(two_step_run):
    """`convert runs/x runs/x/hf` (the documented command) writes a new folder beside the checkpoints;
    converting again with --overwrite replaces only that earlier output."""
    run = two_step_run
    before = _hashes(run)
    assert convert_main([str(run), str(run / "hf")]) == 0
    assert convert_main([str(run), str(run / "hf"), "--overwrite"]) == 0
    assert {k: v for k, v in _hashes(run).items() if not k.startswith("hf/")} == before
    assert (run / "hf" / "config.json").is_file()


def test_other_folder_replacing_commands_refuse_their_input(tmp_path):
    """gguf_to_hf replaces its output folder: a folder holding the GGUF file itself is refused before
    anything is read or removed. The same rule (recipes_core.paths) guards the quickstart's checkpoints."""
    from recipes_core.models import gguf_to_hf
    from recipes_core.paths import UnsafeOutputError, overlap

    gguf = tmp_path / "models" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF not really")
    for out in (gguf.parent, tmp_path, gguf):
        with pytest.raises(UnsafeOutputError, match="the GGUF file"):
            gguf_to_hf(gguf, out, force=True)
    assert gguf.read_bytes() == b"GGUF not really"
    assert [overlap(tmp_path / "a", tmp_path / "a" / "b"), overlap(tmp_path / "a" / "b", tmp_path / "a"),
            overlap(tmp_path / "a", tmp_path / "b")] == ["contains", "lies inside", None]
