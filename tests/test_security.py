"""Checkpoints carry pickles; a checkpoint from elsewhere must not run code. A malicious .metadata and a
malicious .pt dropped into a checkpoint folder are refused by convert, resume and the checkpoint check,
and the payload (os.system touching a marker file) never runs. Models load without remote code unless
the config says so, every torch.load is weights_only=True, and converted folders hold safetensors only.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_checkpoint


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def clean_checkpoint(tiny_models, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"]))
    optimizer = torch.optim.AdamW(model.parameters())
    run = tmp_path_factory.mktemp("clean_run")
    ckpt = write_checkpoint(model, run, tiny_models["instruct"], step=2, optimizer=optimizer)
    torch.save({"torch": torch.get_rng_state()}, ckpt / "rng_rank0.pt")
    return ckpt


@pytest.fixture(params=["metadata", "pt"])
def poisoned(request, clean_checkpoint, tmp_path) -> dict:
    """A copy of a real run folder whose step_2 carries a payload in .metadata or in rng_rank0.pt."""
    run = tmp_path / "run"
    shutil.copytree(clean_checkpoint.parent, run)
    marker = tmp_path / "PWNED"
    ckpt = run / "step_2"
    if request.param == "metadata":
        (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"torch": Payload(marker)}, ckpt / "rng_rank0.pt")
    # The pickle really is a payload: plain pickle.loads of it would run the command.
    assert b"system" in ((ckpt / ".metadata") if request.param == "metadata" else ckpt / "rng_rank0.pt").read_bytes()
    return {"kind": request.param, "run": run, "ckpt": ckpt, "marker": marker}


def test_convert_refuses_a_malicious_metadata(poisoned, tmp_path, capsys):
    from recipes_core.convert import main

    out = tmp_path / "hf"
    try:
        code = main([str(poisoned["ckpt"]), str(out)])
    except SystemExit as exit_info:  # bad input: one `error:` line, exit 2
        code = exit_info.code
    assert not poisoned["marker"].exists(), "the payload ran"
    if poisoned["kind"] == "metadata":
        assert code == 2
        err = capsys.readouterr().err
        assert "refusing to load it" in err and ("os.system" in err or "posix.system" in err), err
        assert not out.exists()
    else:  # convert never reads the RNG files: the weights convert, the payload stays inert
        assert code == 0 and not list(out.glob("*.pt"))


def test_checkpoint_check_refuses_it(poisoned, capsys):
    from recipes_core.checkpoint import find_latest, is_complete
    from recipes_core.doctor import main

    try:
        code = main(["checkpoint", str(poisoned["ckpt"])])
    except SystemExit as exit_info:  # bad input: one `error:` line, exit 2
        code = exit_info.code
    err = capsys.readouterr().err
    assert not poisoned["marker"].exists(), "the payload ran"
    if poisoned["kind"] == "metadata":
        assert code == 2 and "refusing to load it" in err, err
        assert not is_complete(poisoned["ckpt"]) and find_latest(poisoned["run"]) is None
    assert not poisoned["marker"].exists()


@pytest.mark.parametrize("resume", ["path", "auto"])
def test_resume_refuses_it_before_any_step(poisoned, resume, tiny_models, capsys):
    """The real entry point (finetune.main, one rank in this process): exit 2 with one line from the
    preflight check, before the model is even loaded."""
    from recipes_core.finetune import main

    target = str(poisoned["ckpt"]) if resume == "path" else "auto"
    with pytest.raises(SystemExit) as info:
        main(["--config", str(REPO / "cookbook" / "tiny_full.yaml"), "model.source=hf",
              f"model.path={tiny_models['instruct']}", f"checkpoint.output_dir={poisoned['run']}",
              f"checkpoint.resume={target}", "log.progress_bar=false", "data.eval_path="])
    err = capsys.readouterr().err
    assert not poisoned["marker"].exists(), "the payload ran"
    assert info.value.code == 2, err[-2000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "checkpoint.resume" in line
    assert ("refusing to load it" in line) if poisoned["kind"] == "metadata" else ("weights_only" in line)
    assert not (poisoned["run"] / "step_3").exists() and "Traceback" not in err


def test_load_checkpoint_itself_refuses_a_malicious_rng_file(clean_checkpoint, tmp_path):
    """Below preflight: the loader's own torch.load is weights_only=True."""
    from recipes_core.safety import UnsafeCheckpointError, load_torch_file

    marker = tmp_path / "PWNED"
    torch.save({"torch": Payload(marker)}, tmp_path / "rng_rank0.pt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        load_torch_file(tmp_path / "rng_rank0.pt")
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    """Source scan: no torch.load without weights_only=True, no weights_only=False, and no place that
    reads DCP metadata with plain pickle (FileSystemReader.read_metadata) in the library."""
    offenders = []
    for path in [*(REPO / "recipes_core").glob("*.py"), *(REPO / "benchmarks").glob("*.py"),
                 *(REPO / "cookbook").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.name}: {match.group(0)}")
        if re.search(r"weights_only\s*=\s*False\s*[,)]", text):
            offenders.append(f"{path.name}: weights_only=False")
        if path.parent.name == "recipes_core" and re.search(r"\.read_metadata\(\)", text):
            offenders.append(f"{path.name}: DCP read_metadata() unpickles without restriction")
        if path.parent.name == "recipes_core" and re.search(r"pickle\.loads?\(", text):
            offenders.append(f"{path.name}: plain pickle.load")
    assert not offenders, offenders


def test_remote_code_is_off_unless_the_config_says_so():
    from recipes_core.config import Config, load_config

    assert Config().model.trust_remote_code is False
    for recipe in (REPO / "cookbook").glob("*.yaml"):
        assert load_config(recipe).model.trust_remote_code is False, recipe
    for path in (REPO / "recipes_core").glob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(encoding="utf-8"), path


def test_converted_folder_holds_safetensors_only(clean_checkpoint, tmp_path):
    from recipes_core.convert import convert

    out = tmp_path / "hf"
    convert(clean_checkpoint, out, max_shard_size="1MB")  # sharded: several files and an index
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.endswith(".safetensors")], names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], names
