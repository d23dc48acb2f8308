"""A corpus of bad inputs: data files, configs, checkpoints, models and tokenizers. Each one gets an error
that names what is wrong and where; none leaves a partial output that looks complete (a failed
conversion leaves no Hugging Face folder, not even a hidden temporary one).

The first part runs each case in this process, in well under a second once the tiny models exist; the
last part ("through the commands users run") runs them through the real commands: finetune on 2 ranks
under torchrun, the others as `python -m` (exit 2, one `error:` line, no traceback, inputs unchanged).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import DATA_DIR, REPO, write_checkpoint

# ----- data files --------------------------------------------------------------------------------------

GOOD_ALPACA = {"instruction": "Say hi.", "input": "", "output": "hi"}
DATA_CASES = {
    # name: (file name, content, format, error type name, substrings of the message)
    "invalid JSON line": ("a.jsonl", json.dumps(GOOD_ALPACA) + "\n{\"instruction\": \"x\",\n", "alpaca",
                          "DataFormatError", ["a.jsonl", "row 2", "invalid JSON"]),
    "missing field": ("a.jsonl", json.dumps({"instruction": "x", "input": ""}) + "\n", "alpaca",
                      "DataFormatError", ["row 1", "field 'output'", "missing"]),
    "wrong field type": ("a.jsonl", json.dumps({**GOOD_ALPACA, "output": 3}) + "\n", "alpaca",
                         "DataFormatError", ["row 1", "field 'output'", "should be str"]),
    "empty answer": ("a.jsonl", json.dumps({**GOOD_ALPACA, "output": "  "}) + "\n", "alpaca",
                     "DataFormatError", ["row 1", "field 'output'", "empty"]),
    "empty file": ("a.jsonl", "\n\n", "alpaca", "DataFormatError", ["a.jsonl", "no rows"]),
    "unsupported file type": ("a.csv", "instruction,output\nx,y\n", "alpaca", "DataFormatError",
                              ["a.csv", "unsupported file type"]),
    "chat without assistant turn": ("c.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
                                    "chat", "DataFormatError", ["row 1", "no assistant turn"]),
    "chat unknown role": ("c.jsonl", json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n", "chat",
                          "DataFormatError", ["row 1", "messages[0].role", "'bot'"]),
    "label out of range": ("p.jsonl", json.dumps({"sentence1": "a", "sentence2": "b", "label": 2}) + "\n",
                           "classification", "DataFormatError", ["row 1", "field 'label'", "0 or 1"]),
    "missing data file": ("missing.jsonl", None, "alpaca", "DataFileNotFoundError", ["missing.jsonl", "no such data file"]),
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_data_file(name, tmp_path):
    from recipes_core.data import load_records

    file_name, content, fmt, error, needles = DATA_CASES[name]
    path = tmp_path / file_name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(Exception) as info:
        load_records(path, fmt)
    assert type(info.value).__name__ == error, info.value
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


# ----- configs -----------------------------------------------------------------------------------------

CONFIG_CASES = {
    "unknown key": (["train.learning_rate=1e-4"], ["train.learning_rate", "did you mean 'train.lr'"]),
    "unknown section": (["trainer.lr=1e-4"], ["trainer.lr"]),
    "wrong type": (["train.max_steps=ten"], ["train.max_steps", "expected int", "'ten'"]),
    "wrong type bool": (["data.packing=maybe"], ["data.packing", "expected bool"]),
    "impossible value micro batch": (["train.micro_batch_size=0"], ["train.micro_batch_size", "at least 1"]),
    "impossible choice": (["data.format=xml"], ["data.format='xml'", "choose one of"]),
    "not key=value": (["train.lr"], ["train.lr", "not key=value"]),
    "hf source without path": (["model.source=hf"], ["model.source=hf needs model.path"]),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config_override(name):
    from recipes_core.config import ConfigError, load_config

    overrides, needles = CONFIG_CASES[name]
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "cookbook" / "tiny_full.yaml", overrides)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_bad_config_file(tmp_path):
    from recipes_core.config import ConfigError, load_config

    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1e-3\n  bach_size: 4\n")
    with pytest.raises(ConfigError, match="train.bach_size"):
        load_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


PREFLIGHT_VALUES = {
    "zero learning rate": ("train.lr=0", "train.lr=0.0 must be greater than 0"),
    "negative save_every": ("checkpoint.save_every=-5", "checkpoint.save_every=-5 must not be negative"),
    "min_lr_ratio above 1": ("train.min_lr_ratio=1.5", "train.min_lr_ratio=1.5 must be between 0 and 1"),
    "beta of 1": ("train.betas=[0.9,1.0]", "train.betas=[0.9, 1.0] must be two numbers in [0, 1)"),
}


@pytest.mark.parametrize("name", sorted(PREFLIGHT_VALUES))
def test_impossible_values_are_refused_by_the_config(name):
    """config.py is the one place values are checked: load_config refuses them (preflight asks the same
    config_errors for a Config built in code)."""
    from recipes_core.config import ConfigError, config_errors, from_dict, load_config

    override, message = PREFLIGHT_VALUES[name]
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "cookbook" / "tiny_full.yaml", [override])
    assert str(info.value) == message
    section, _, rest = override.partition(".")
    key, _, value = rest.partition("=")
    assert config_errors(from_dict({section: {key: value}})) == [message]  # a Config built in code


def test_good_config_passes_preflight():
    from recipes_core.config import config_errors, load_config

    for recipe in sorted((REPO / "cookbook").glob("*.yaml")):
        assert config_errors(load_config(recipe)) == [], recipe


# ----- checkpoints -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_checkpoint(tiny_models, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"]))
    return write_checkpoint(model, tmp_path_factory.mktemp("good_ckpt"), tiny_models["instruct"], step=3)


def _shard(ckpt: Path) -> Path:
    return next(ckpt.glob("*.distcp"))


def _edit_params(ckpt: Path, **model_config) -> None:
    params = yaml.safe_load((ckpt / "train_params.yaml").read_text())
    params["model_config"].update(model_config)
    (ckpt / "train_params.yaml").write_text(yaml.safe_dump(params))


CHECKPOINT_CASES = {
    # name: (damage, substrings of the error)
    "missing .metadata": (lambda c: (c / ".metadata").unlink(), [".metadata is missing"]),
    "truncated .metadata": (lambda c: (c / ".metadata").write_bytes((c / ".metadata").read_bytes()[:40]),
                            ["unreadable checkpoint metadata", "damaged or incomplete"]),
    "missing shard": (lambda c: _shard(c).unlink(), ["__0_0.distcp is missing"]),
    "truncated shard": (lambda c: _shard(c).write_bytes(_shard(c).read_bytes()[:1000]),
                        ["__0_0.distcp has 1000 bytes", ".metadata says"]),
    "missing train_params.yaml": (lambda c: (c / "train_params.yaml").unlink(), ["train_params.yaml is missing"]),
    "shape mismatch with model config": (lambda c: _edit_params(c, intermediate_size=96),
                                         ["do not have the shapes model_config gives", "mlp"]),
    "fewer layers than model config": (lambda c: _edit_params(c, num_hidden_layers=9),
                                       ["lacks", "weights the model_config needs"]),
    "not a folder": (lambda c: shutil.rmtree(c), ["not a folder"]),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint_is_refused_and_leaves_no_output(name, good_checkpoint, tmp_path, capsys):
    from recipes_core.convert import main

    ckpt = tmp_path / "step_3"
    shutil.copytree(good_checkpoint, ckpt)
    damage, needles = CHECKPOINT_CASES[name]
    damage(ckpt)
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as exit_info:
        main([str(ckpt), str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists(), "a failed conversion must not leave a folder"
    assert [p.name for p in tmp_path.iterdir()] == (["step_3"] if ckpt.exists() else []), list(tmp_path.iterdir())


def test_good_checkpoint_converts(good_checkpoint, tmp_path):
    from recipes_core.convert import convert

    result = convert(good_checkpoint, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file() and result.step == 3


def test_resume_from_a_checkpoint_of_another_model_is_refused(good_checkpoint, tiny_models, tmp_path):
    """Resuming needs the model the checkpoint was trained from: preflight compares shapes before DCP
    would fail deep inside its load planner."""
    from recipes_core.config import load_config
    from recipes_core.models import load_model_config
    from recipes_core.preflight import shape_errors

    cfg = load_config(None, [f"checkpoint.resume={good_checkpoint}", f"checkpoint.output_dir={tmp_path}"])
    model_config = load_model_config(tiny_models["instruct"])
    assert shape_errors(cfg, model_config) == []
    wider = {**model_config, "intermediate_size": model_config["intermediate_size"] * 2}
    (error,) = shape_errors(cfg, wider)
    assert str(good_checkpoint) in error and "mlp" in error and "does not fit the model config" in error


# ----- models and tokenizers ---------------------------------------------------------------------------

def test_model_folder_without_config(tmp_path):
    from recipes_core.config import load_config
    from recipes_core.models import resolve_model_source
    from recipes_core.preflight import input_errors

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_source("hf", str(tmp_path))
    (error,) = input_errors(load_config(None, ["model.source=hf", f"model.path={tmp_path}"]))
    assert f"model.path={tmp_path}" in error and "no config.json" in error


def test_missing_gguf_file(tmp_path):
    from recipes_core.models import gguf_to_hf

    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        gguf_to_hf(tmp_path / "model.Q4.gguf")


def test_missing_data_file_is_named_by_preflight(tmp_path):
    from recipes_core.config import load_config
    from recipes_core.preflight import input_errors

    (error,) = input_errors(load_config(None, [f"data.train_path={tmp_path / 'nope.jsonl'}", "data.eval_path="]))
    assert "data.train_path=" in error and "nope.jsonl: no such file" in error


def test_tokenizer_without_pad_or_template(instruct_tokenizer, base_tokenizer):
    import copy

    from recipes_core.preflight import tokenizer_errors

    assert tokenizer_errors(instruct_tokenizer, "instruct", "chat") == []
    (error,) = tokenizer_errors(base_tokenizer, "base", "chat")
    assert "base has no chat template" in error
    assert tokenizer_errors(base_tokenizer, "base", "alpaca") == []
    no_pad = copy.deepcopy(instruct_tokenizer)
    no_pad.pad_token = None
    (error,) = tokenizer_errors(no_pad, "instruct", "alpaca")
    assert "instruct has no pad token" in error


def test_corrupt_tokenizer_file(tiny_models, tmp_path):
    from recipes_core.tokens import load_tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(tiny_models["instruct"], folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(Exception) as info:
        load_tokenizer(folder)
    assert "Traceback" not in str(info.value)
    print(f"corrupt tokenizer.json: {type(info.value).__name__}: {str(info.value)[:200]}")


def test_the_corpus_has_at_least_fifteen_kinds():
    kinds = len(DATA_CASES) + len(CONFIG_CASES) + len(PREFLIGHT_VALUES) + len(CHECKPOINT_CASES) + 2 + 6
    print(f"bad input kinds: {kinds}")
    assert kinds >= 15 and DATA_DIR.is_dir()


# ----- through the commands users run --------------------------------------------------------------------
# Each case: exit status 2, exactly one line starting with `error:` (stderr and stdout together) that names
# the file (and row, field or line), no traceback anywhere, and every input file byte-identical after.
# finetune runs under torchrun with 2 ranks (recipes_core.launch.run_recipe) and fails in its preflight,
# before any model is built; convert / infer / doctor / checkpoint / quickstart run as `python -m`.

ALPACA_ROW = json.dumps(GOOD_ALPACA)
CHAT_OK = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _tree_bytes(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_one_error_line(proc, *needles: str) -> str:
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, output[-3000:]
    assert len(lines) == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _model_copy(tiny_models, root: Path, damage) -> Path:
    folder = root / "model"
    shutil.copytree(tiny_models["instruct"], folder)
    damage(folder)
    return folder


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _drop_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def _grow_tokenizer(folder: Path) -> None:
    """A tokenizer with one id more than the model's embedding rows (config.json keeps its vocab_size)."""
    from recipes_core.tokens import load_tokenizer

    tokenizer = load_tokenizer(folder)
    tokenizer.add_tokens(["<|extra_token|>"])
    tokenizer.save_pretrained(folder)


# name: (files {name: bytes}, model damage or None, finetune args (with {dir}), needles (with {dir}))
FINETUNE_CASES = {
    "empty train file": ({"t.jsonl": b""}, None, [], ["t.jsonl", "no rows"]),
    "blank-lines train file": ({"t.jsonl": b"\n  \n\n"}, None, [], ["t.jsonl", "no rows"]),
    "UTF-8 BOM and a bad row": ({"t.jsonl": b"\xef\xbb\xbf" + ALPACA_ROW.encode() + b"\n{\"instruction\": 1}\n"},
                                None, [], ["t.jsonl", "row 2", "field 'instruction'"]),
    "JSON array in .jsonl": ({"t.jsonl": f"[{ALPACA_ROW}, {ALPACA_ROW}]\n".encode()}, None, [],
                             ["t.jsonl", "row 1", "JSON array"]),
    "output null": ({"t.jsonl": json.dumps({**GOOD_ALPACA, "output": None}).encode()}, None, [],
                    ["t.jsonl", "row 1", "field 'output'", "null"]),
    "output number": ({"t.jsonl": json.dumps({**GOOD_ALPACA, "output": 7}).encode()}, None, [],
                      ["t.jsonl", "row 1", "field 'output'", "should be str"]),
    "output list": ({"t.jsonl": json.dumps({**GOOD_ALPACA, "output": ["a"]}).encode()}, None, [],
                    ["t.jsonl", "row 1", "field 'output'", "should be str"]),
    "chat role tool": ({"t.jsonl": json.dumps({"messages": [CHAT_OK[0], {"role": "tool", "content": "x"},
                                                            CHAT_OK[1]]}).encode()},
                       None, ["data.format=chat"], ["t.jsonl", "row 1", "messages[1].role", "'tool'"]),
    "chat without assistant turn": ({"t.jsonl": json.dumps({"messages": CHAT_OK[:1]}).encode()}, None,
                                    ["data.format=chat"], ["t.jsonl", "row 1", "no assistant turn"]),
    "chat null content": ({"t.jsonl": json.dumps({"messages": [CHAT_OK[0], {"role": "assistant",
                                                                            "content": None}]}).encode()},
                          None, ["data.format=chat"], ["t.jsonl", "row 1", "messages[1]", "'content'"]),
    "label outside the label set": ({"t.jsonl": json.dumps({"sentence1": "a", "sentence2": "b",
                                                            "label": 5}).encode()},
                                    None, ["data.format=classification"], ["t.jsonl", "row 1", "field 'label'"]),
    "train_path is a folder": ({"folder.jsonl/x": b""}, None, ["data.train_path={dir}/folder.jsonl"],
                               ["folder.jsonl", "a folder"]),
    "every answer truncated away": ({"t.jsonl": (ALPACA_ROW + "\n").encode() * 4}, None, ["data.max_seq_len=16"],
                                    ["t.jsonl", "no example keeps a supervised token", "data.max_seq_len=16"]),
    "max_seq_len 1": ({"t.jsonl": ALPACA_ROW.encode()}, None, ["data.max_seq_len=1"],
                      ["data.max_seq_len=1", "at least 2"]),
    "invalid UTF-8": ({"t.jsonl": (ALPACA_ROW + "\n").encode() + b'{"instruction": "caf\xe9"}\n'}, None, [],
                      ["t.jsonl", "line 2", "0xe9", "not UTF-8"]),
    "YAML with a tab": ({"c.yaml": b"train:\n\tlr: 0.001\n"}, None, ["--config", "{dir}/c.yaml"],
                        ["c.yaml", "line 2", "tabs"]),
    "YAML syntax error": ({"c.yaml": b"train: {lr: 0.001\n"}, None, ["--config", "{dir}/c.yaml"],
                          ["c.yaml", "invalid YAML", "line"]),
    "mistyped --config": ({}, None, ["--config", "{dir}/tiny_ful.yaml"], ["tiny_ful.yaml", "no such file"]),
    "truncated config.json": ({}, lambda m: _truncate(m / "config.json", 50), [], ["config.json", "not valid JSON"]),
    "corrupt safetensors header": ({}, lambda m: (m / "model.safetensors").write_bytes(b"\xff" * 64), [],
                                   ["model.safetensors", "not a readable safetensors file"]),
    "model folder without tokenizer files": ({}, _drop_tokenizer, [], ["model", "no tokenizer files"]),
    # the job runs with CXX pointing nowhere (see the test): only this case asks for the compiler
    "train.compile without a C++ compiler": ({}, None, ["train.compile=true"],
                                             ["train.compile=true", "C++ compiler", "/no/such/c++"]),
    "tokenizer past the embedding": ({"t.jsonl": (ALPACA_ROW + "\n").encode() * 3 + json.dumps(
        {**GOOD_ALPACA, "output": "<|extra_token|>"}).encode()}, _grow_tokenizer, [],
        ["t.jsonl", "row 4", "<|extra_token|>", "embedding", "rows", "ids"]),
}


def _write_case(root: Path, files: dict) -> None:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if not name.endswith("/x"):
            (root / name).write_bytes(content)


def _finetune_argv(name: str, root: Path, tiny_models) -> list[str]:
    """Write case `name`'s inputs under root and return its finetune arguments."""
    files, damage, args, _ = FINETUNE_CASES[name]
    root.mkdir(parents=True)
    _write_case(root, files)
    model = _model_copy(tiny_models, root, damage) if damage else tiny_models["instruct"]
    args = [a.format(dir=root) for a in args]
    config = [] if "--config" in args else ["--config", str(REPO / "cookbook" / "tiny_full.yaml")]
    train = [] if any(a.startswith("data.train_path=") for a in args) else [f"data.train_path={root / 't.jsonl'}"]
    if train and not (root / "t.jsonl").exists():  # the case damages something else: a good data file
        (root / "t.jsonl").write_text((ALPACA_ROW + "\n") * 16)
    return [*config, *args, *train, "model.source=hf", f"model.path={model}", "data.eval_path=",
            "train.micro_batch_size=1", "train.grad_accum_steps=1", "log.progress_bar=false", "log.tensorboard=false",
            f"checkpoint.output_dir={root.parent / (root.name + '_run')}"]


def _error_line(output: str, *needles: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_finetune_bad_inputs_under_torchrun(tiny_models, tmp_path):
    """Every case through finetune's own main on 2 ranks of one torchrun job (one launch for all; see
    tests/bad_inputs_ranks.py): exit status 2 on both ranks, one `error:` line from rank 0 and none from
    rank 1, the file (row, field, line) named, no traceback, the inputs unchanged, no checkpoint."""
    import os
    import subprocess

    from recipes_core.launch import launch_command

    cases = {name: _finetune_argv(name, tmp_path / f"case{i}", tiny_models) for i, name in enumerate(FINETUNE_CASES)}
    before = {name: _tree_bytes(tmp_path / f"case{i}") for i, name in enumerate(FINETUNE_CASES)}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    # A timeout, not run_script: without the fix a rank that dies while the other waits in a collective hangs.
    command = launch_command(2, args=[str(tmp_path / "cases.json"), str(tmp_path)],
                             script=REPO / "tests" / "bad_inputs_ranks.py")
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CXX": "/no/such/c++"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for i, (name, (_, _, _, needles)) in enumerate(FINETUNE_CASES.items()):
        root = tmp_path / f"case{i}"
        assert ranks[0][name]["code"] == ranks[1][name]["code"] == 2, (name, ranks[0][name], ranks[1][name])
        line = _error_line(ranks[0][name]["output"], *[n.format(dir=root) for n in needles])
        assert "error:" not in ranks[1][name]["output"] and "Traceback" not in ranks[1][name]["output"], name
        print(f"{name}: {line}")
        assert _tree_bytes(root) == before[name], name
        assert not list((tmp_path / f"case{i}_run").glob("step_*")), name


def test_finetune_bad_data_exits_2_from_the_launcher(tiny_models, tmp_path):
    """One case as a whole job: the launcher itself exits 2, rank 0 alone prints the line."""
    from recipes_core.launch import run_recipe

    args = _finetune_argv("invalid UTF-8", tmp_path / "case", tiny_models)
    before = _tree_bytes(tmp_path / "case")
    proc = run_recipe(args, nproc=2, cwd=REPO, check=False, env={"OMP_NUM_THREADS": "1"})
    _assert_one_error_line(proc, "t.jsonl", "line 2", "not UTF-8")
    assert _tree_bytes(tmp_path / "case") == before


def test_a_bom_is_accepted(tmp_path):
    """Editors on Windows start UTF-8 files with a byte-order mark; the rows read the same without it."""
    from recipes_core.data import load_records

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (ALPACA_ROW + "\n").encode() * 2)
    assert load_records(path, "alpaca").to_list() == [GOOD_ALPACA, GOOD_ALPACA]


def _start_python_m(module: str, *args) -> "subprocess.Popen":
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(process: "subprocess.Popen") -> "subprocess.CompletedProcess":
    import subprocess

    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _python_m(module: str, *args) -> "subprocess.CompletedProcess":
    return _finished(_start_python_m(module, *args))


def test_doctor_data_refuses_what_training_would(tiny_models, tmp_path):
    """`doctor data` stops on the same untrainable data as finetune's preflight: nothing supervised after
    truncation, and a token past the embedding (the tokenizer folder's config.json gives its rows)."""
    data = tmp_path / "t.jsonl"
    data.write_text((ALPACA_ROW + "\n") * 3 + json.dumps({**GOOD_ALPACA, "output": "<|extra_token|>"}) + "\n")
    model = _model_copy(tiny_models, tmp_path, _grow_tokenizer)
    before = _tree_bytes(tmp_path)
    proc = _python_m("recipes_core.doctor", "data", data, "--format", "alpaca", "--tokenizer", model)
    _assert_one_error_line(proc, "t.jsonl", "row 4", "<|extra_token|>", "embedding")
    proc = _python_m("recipes_core.doctor", "data", data, "--format", "alpaca", "--tokenizer",
                     tiny_models["instruct"], "--max-seq-len", 16)
    _assert_one_error_line(proc, "t.jsonl", "no example keeps a supervised token", "--max-seq-len 16")
    assert _tree_bytes(tmp_path) == before


def test_infer_batch_size_zero(tiny_models, tmp_path):
    proc = _python_m("recipes_core.infer", tiny_models["instruct"], "--prompt", "hi", "--batch-size", 0)
    _assert_one_error_line(proc, "--batch-size 0", "at least 1")


def test_every_command_exits_2_with_one_error_line(tiny_models, good_checkpoint, tmp_path):
    """Issue 14: one wrapper for every command; each gets one bad input and answers the same way (finetune:
    test_finetune_bad_data_exits_2_from_the_launcher)."""
    missing = tmp_path / "missing"
    damaged = _model_copy(tiny_models, tmp_path, lambda m: _truncate(m / "config.json", 50))
    ckpt = tmp_path / "step_3"
    shutil.copytree(good_checkpoint, ckpt)
    (ckpt / ".metadata").unlink()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n{\"prompt\": \n")
    before = _tree_bytes(tmp_path)
    cases = {  # command: (its process, what its error line names); all start at once: they are independent
        "convert": (_start_python_m("recipes_core.convert", ckpt, tmp_path / "hf"), ["step_3", ".metadata is missing"]),
        "infer": (_start_python_m("recipes_core.infer", tiny_models["instruct"], "--prompts-file", prompts),
                  ["p.jsonl", "row 2", "invalid JSON"]),
        "doctor": (_start_python_m("recipes_core.doctor", "model", damaged), ["model/config.json", "not valid JSON"]),
        "checkpoint": (_start_python_m("recipes_core.checkpoint", "size", missing), ["missing", "is not a folder"]),
        "quickstart": (_start_python_m("recipes_core.quickstart", "--steps", 0, "--out", missing), ["--steps 0"]),
        "export_gguf": (_start_python_m("recipes_core.export_gguf", missing, tmp_path / "m.gguf"),
                        ["missing", "config.json"]),
        "evaluate": (_start_python_m("recipes_core.evaluate", missing), ["missing", "no such model folder"]),
        "plan": (_start_python_m("recipes_core.plan", "--model", missing, "--world-size", 2), ["missing", "known shape"]),
    }
    for command, (process, needles) in cases.items():
        print(f"{command}: {_assert_one_error_line(_finished(process), *needles)}")
    assert _tree_bytes(tmp_path) == before and not missing.exists() and not (tmp_path / "hf").exists()
    assert not (tmp_path / "m.gguf").exists()
