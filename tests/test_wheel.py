"""The library stands alone: built as a wheel and installed outside the source tree, `import recipes_core`
comes from the installed copy and `python -m recipes_core.quickstart` finds everything it reads (the dataset
generator, the tiny model's corpus, its packaged config) without a checkout's cookbook/ folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_installed_wheel_runs_the_quickstart_outside_the_source_tree(tiny_models, tmp_path):
    # Build from a copy, so that the build leaves no build/ or *.egg-info in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(REPO / "recipes_core", source / "recipes_core", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("recipes_core-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    shutil.rmtree(source)  # nothing of the source tree is left to fall back on

    # PYTHONPATH=site wins over the .venv's editable install of the checkout; the cwd is outside the checkout.
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    # The quickstart's own step 1 (data, tiny models, its packaged config loaded with the run's overrides);
    # the full pipeline after it is the quickstart_run fixture's, from the checkout.
    proc = subprocess.run([sys.executable, "-m", "recipes_core.quickstart", "--out", "run", "--prepare-only",
                           "--eval-prompts", "2"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = work / "run"
    # recipes_core resolved into the installed copy: the config it found is the wheel's package data
    assert f"config {site / 'recipes_core' / 'configs' / 'quickstart.yaml'}" in proc.stdout, proc.stdout
    for name in ("chat_train.jsonl", "chat_eval.jsonl", "alpaca_train.jsonl"):  # the cookbook's files, byte for byte
        assert (run / "data" / name).read_bytes() == (REPO / "cookbook" / "data" / name).read_bytes(), name
    for variant in ("base", "instruct"):  # tokenizer trained on the corpus generated in memory: the same bytes
        for name in ("tokenizer.json", "model.safetensors"):  # as the models conftest builds from cookbook/data
            assert (run / "models" / variant / name).read_bytes() == (tiny_models[variant] / name).read_bytes()
