"""Preflight: a run that cannot finish stops before its first step with one line naming what is wrong
and how to fix it (exit status 2, no traceback), and leaves no checkpoint behind.

The cases call recipes_core.finetune.main in this process (one rank, the same code path as a plain
`python -m recipes_core.finetune`); one case runs the real command line in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA_DIR, REPO

BASE = ["data.max_train_examples=16", "data.eval_path=", "data.max_seq_len=64", "train.max_steps=2",
        "train.micro_batch_size=2", "log.progress_bar=false", "log.tensorboard=false", "log.peak_flops=1e12"]


def run_main(args: list[str], capsys) -> tuple[int, str]:
    import torch

    from recipes_core.finetune import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(REPO / "cookbook" / "tiny_full.yaml"), *BASE, *args])
    finally:
        torch.set_num_threads(threads)
    return exit_info.value.code, capsys.readouterr().err


def assert_refused_before_training(code: int, err: str, out: Path, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: preflight: "), err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists(), f"a run that failed preflight left {out} behind: {list(out.iterdir())}"


@pytest.fixture(scope="module")
def tokenizer_variants(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The instruct tokenizer saved without a pad token, and without a chat template."""
    from recipes_core.tokens import load_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    no_pad = load_tokenizer(tiny_models["instruct"])
    no_pad.pad_token = None
    no_pad.save_pretrained(root / "no_pad")
    no_template = load_tokenizer(tiny_models["instruct"])
    no_template.chat_template = None
    no_template.save_pretrained(root / "no_template")
    for name in ("no_template",):
        for leftover in (root / name).glob("chat_template*"):
            leftover.unlink()
    assert load_tokenizer(root / "no_pad").pad_token_id is None
    assert not load_tokenizer(root / "no_template").chat_template
    return {"no_pad": root / "no_pad", "no_template": root / "no_template"}


def model_args(tiny_models) -> list[str]:
    return ["model.source=hf", f"model.path={tiny_models['instruct']}"]


def test_output_dir_that_cannot_be_written(tiny_models, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"  # fails even for root, unlike a chmod
    code, err = run_main([*model_args(tiny_models), f"checkpoint.output_dir={out}"], capsys)
    assert_refused_before_training(code, err, out, "checkpoint.output_dir", "cannot write")


def test_not_enough_disk_for_the_predicted_checkpoint(tiny_models, tmp_path, capsys, monkeypatch):
    from recipes_core.checkpoint import predict_sizes
    from recipes_core.preflight import MIB, predicted_checkpoint_bytes
    from recipes_core.config import load_config
    from recipes_core.models import load_model_config

    cfg = load_config(REPO / "cookbook" / "tiny_full.yaml", BASE)
    needed, saved, trainable = predicted_checkpoint_bytes(cfg, load_model_config(tiny_models["instruct"]))
    assert needed == predict_sizes(saved, trainable)["total"] == 12 * saved  # fp32 + AdamW, nothing tied
    monkeypatch.setenv("RECIPES_FAULT_DISK_FREE_BYTES", str(needed // 2))  # half a checkpoint free
    out = tmp_path / "run"
    code, err = run_main([*model_args(tiny_models), f"checkpoint.output_dir={out}"], capsys)
    assert_refused_before_training(code, err, out, "not enough free disk", f"{needed / 2 / MIB:.1f} MiB free",
                                   "checkpoint.save_optimizer=false")
    # Model-only checkpoints are a third of the size and fit: preflight lets that run start.
    monkeypatch.setenv("RECIPES_FAULT_DISK_FREE_BYTES", str(needed // 2))
    from recipes_core.preflight import disk_errors

    model_only = load_config(REPO / "cookbook" / "tiny_full.yaml",
                             BASE + ["checkpoint.save_optimizer=false", f"checkpoint.output_dir={out}"])
    assert disk_errors(model_only, load_model_config(tiny_models["instruct"]))[0] == []


def test_world_size_that_does_not_divide_the_hsdp_mesh(tiny_models, tmp_path, capsys):
    from recipes_core.preflight import mesh_errors

    out = tmp_path / "run"
    code, err = run_main([*model_args(tiny_models), "fsdp.sharding=hybrid", "fsdp.replicate_degree=2",
                          f"checkpoint.output_dir={out}"], capsys)
    assert_refused_before_training(code, err, out, "fsdp.replicate_degree", "world size 1")
    assert mesh_errors("hybrid", 4, 6, 2) and mesh_errors("hybrid", 0, 6, 4)  # 6 ranks: 4 replicas; 1.5 nodes
    assert not mesh_errors("hybrid", 0, 4, 2) and not mesh_errors("hybrid", 2, 4, 4)
    assert not mesh_errors("full", 3, 4, 2)


def test_tokenizer_without_pad_token(tiny_models, tokenizer_variants, tmp_path, capsys):
    out = tmp_path / "new" / "run"  # neither folder exists: preflight must create neither
    code, err = run_main([*model_args(tiny_models), f"model.tokenizer={tokenizer_variants['no_pad']}",
                          f"checkpoint.output_dir={out}"], capsys)
    assert_refused_before_training(code, err, out, "no pad token", str(tokenizer_variants["no_pad"]))
    assert not out.parent.exists()
    # A folder that existed before keeps exactly its contents (no config.yaml is written into it).
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, err = run_main([*model_args(tiny_models), f"model.tokenizer={tokenizer_variants['no_pad']}",
                          f"checkpoint.output_dir={tmp_path / 'mine'}"], capsys)
    assert code == 2 and [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"], err[-2000:]


def test_chat_data_with_a_tokenizer_without_chat_template(tiny_models, tokenizer_variants, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main([*model_args(tiny_models), f"model.tokenizer={tokenizer_variants['no_template']}",
                          "data.format=chat", f"data.train_path={DATA_DIR / 'chat_train.jsonl'}",
                          f"checkpoint.output_dir={out}"], capsys)
    assert_refused_before_training(code, err, out, "no chat template", "data.format=chat")
    # The base model's own tokenizer has no template either.
    code, err = run_main(["model.source=hf", f"model.path={tiny_models['base']}", "data.format=chat",
                          f"data.train_path={DATA_DIR / 'chat_train.jsonl'}", f"checkpoint.output_dir={out}"], capsys)
    assert_refused_before_training(code, err, out, "no chat template")


@pytest.mark.slow
def test_command_line_exit_status_and_single_line(tiny_models, tmp_path):
    """The real command: exit status 2, one `error:` line on stderr, no traceback, nothing written."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "recipes_core.finetune", "--config",
                           str(REPO / "cookbook" / "tiny_full.yaml"), *BASE, *model_args(tiny_models),
                           "fsdp.sharding=hybrid", "fsdp.replicate_degree=3",
                           f"checkpoint.output_dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "replicate_degree" in errors[0] and "divide" in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()
