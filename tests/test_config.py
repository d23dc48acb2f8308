"""YAML + key=value configs: types, unknown keys with suggestions, the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes_core.config import Config, ConfigError, from_dict, load_config, to_dict, valid_keys

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "cookbook").glob("*.yaml"))


def test_overrides_are_typed():
    config = load_config(None, ["train.lr=3e-4", "train.max_steps=7", "fsdp.activation_checkpointing=true",
                                "train.betas=[0.9, 0.99]", "lora.target_modules=[q_proj, v_proj]",
                                "checkpoint.resume=auto"])
    assert config.train.lr == 3e-4 and isinstance(config.train.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert config.train.max_steps == 7 and config.fsdp.activation_checkpointing is True
    assert config.train.betas == (0.9, 0.99) and config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.checkpoint.resume == "auto"


@pytest.mark.parametrize("key, suggestion", [("train.learning_rate", "train.lr"), ("trian.lr", "train.lr"),
                                             ("checkpoint.save_evry", "checkpoint.save_every"),
                                             ("train.gradient_accumulation_steps", "train.grad_accum_steps")])
def test_unknown_key_suggests_the_nearest(key, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_config(None, [f"{key}=1"])


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  epoch: 2\n")
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_config(path)


@pytest.mark.parametrize("override, message", [("train.lr=fast", "expected float"),
                                               ("train.max_steps=1.5", "expected int"),
                                               ("fsdp.sharding=zero3", "choose one of"),
                                               ("train.micro_batch_size=0", "at least 1"),
                                               ("model.source=hf", "needs model.path"),
                                               ("train.lr", "not key=value")])
def test_bad_values_are_explained(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_round_trip_through_a_dict():
    config = load_config(None, ["train.lr=1e-3", "lora.enabled=true"])
    assert from_dict(to_dict(config)) == config
    assert len(valid_keys()) == len(set(valid_keys())) > 30


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_load(recipe):
    assert isinstance(load_config(recipe), Config)


def test_command_line_rejects_unknown_keys_before_loading_anything(capsys):
    from recipes_core.finetune import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(REPO / "cookbook" / "tiny_full.yaml"), "train.learning_rate=1e-4"])
    assert exit_info.value.code == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
