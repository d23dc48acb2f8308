"""Faults survived, nothing lost: a rank SIGKILLed in the middle of a save and again after a step, with
torchrun restarting the job on its own (checkpoint.resume=auto), ends with exactly the losses of an
uninterrupted run.

Two 2-rank torchrun jobs on the tiny model (8 steps, checkpoints every 2):
  reference  uninterrupted
  faulted    RECIPES_FAULT_KILL_IN_SAVE=4 and RECIPES_FAULT_KILL_AT_STEP=7 (rank 0), one torchrun job
             with --max-restarts=2, which torchrun restarts on its own after each kill:
             attempt 1 runs steps 1-4 and dies while step_4 is being saved (shards and .metadata in
             .tmp_step_4/, no rename); attempt 2 removes .tmp_step_4, resumes from step_2, saves 4 and 6,
             dies right after step 7; attempt 3 resumes from step_6 and finishes.
Every loss logged by any attempt must equal the reference loss of that step, bit for bit (CPU, gloo).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, exit_code

STEPS, SAVE_EVERY, KILL_IN_SAVE, KILL_AT_STEP = 8, 2, 4, 7
OVERRIDES = ["data.format=chat", "data.train_path=cookbook/data/chat_train.jsonl", "data.eval_path=",
             "data.max_seq_len=64", "data.max_train_examples=48", "train.micro_batch_size=2",
             "train.grad_accum_steps=1", "train.lr=2e-3", "train.warmup_steps=2", f"train.max_steps={STEPS}",
             "train.seed=11", "train.eval_every=0", f"checkpoint.save_every={SAVE_EVERY}", "checkpoint.keep_last_n=0",
             "checkpoint.resume=auto", "log.progress_bar=false", "log.tensorboard=false", "log.peak_flops=1e12"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECIPES_FAULT_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def torchrun(nproc: int, out: Path, model_dir: Path, extra: list[str] = (), restarts: int = 0,
             env: dict | None = None, timeout: int = 400, check: bool = True) -> subprocess.CompletedProcess:
    # Restarts rely on distributed._attempt_store: without its per-attempt prefix the restarted gloo group
    # can read the killed rank's address from the store and fail to connect.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", out.name,
           "--max-restarts", str(restarts), "--monitor-interval", "0.5",
           "-m", "recipes_core.finetune", "--config", str(REPO / "cookbook" / "tiny_full.yaml"), *OVERRIDES,
           "model.source=hf", f"model.path={model_dir}", f"checkpoint.output_dir={out}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    print(f"torchrun {nproc} ranks, {restarts} restarts allowed: {time.perf_counter() - start:.1f} s")
    if check and proc.returncode != 0:
        events = [line[:300] for line in (proc.stdout + proc.stderr).splitlines()
                  if re.search(r"FAULT|resumed|removed|Error|error|failed|restart", line)]
        pytest.fail(f"torchrun failed (exit {proc.returncode}):\n" + "\n".join(events[-60:]))
    return proc


def train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def start_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "start"]


@pytest.fixture(scope="module")
def recovery_runs(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("recovery")
    model = tiny_models["instruct"]
    reference = torchrun(2, root / "reference", model)
    env = child_env(RECIPES_FAULT_KILL_IN_SAVE=str(KILL_IN_SAVE), RECIPES_FAULT_KILL_AT_STEP=str(KILL_AT_STEP),
                     RECIPES_FAULT_RANK="0")
    # One torchrun job; torchrun itself restarts it after each SIGKILL (--max-restarts=2).
    faulted = torchrun(2, root / "faulted", model, env=env, restarts=2)
    return {"reference": root / "reference", "faulted": root / "faulted", "reference_proc": reference,
            "faulted_proc": faulted}


@pytest.mark.slow
def test_killed_rank_restarts_and_finishes_with_identical_losses(recovery_runs):
    """Item 1: SIGKILL after step 7; torchrun restarts the job, resume=auto picks step_6, and every loss
    (including the steps run twice) equals the uninterrupted run's."""
    out = recovery_runs["faulted"]
    assert (out / f".fault_kill_at_step_{KILL_AT_STEP}").is_file(), "the fault did not fire"
    reference = {r["step"]: r["loss"] for r in train_records(recovery_runs["reference"])}
    assert sorted(reference) == list(range(1, STEPS + 1))
    records = train_records(out)
    assert {r["step"] for r in records} == set(range(1, STEPS + 1))
    mismatched = [(r["step"], r["loss"], reference[r["step"]]) for r in records if r["loss"] != reference[r["step"]]]
    print(f"{len(records)} losses logged by 3 attempts of one job; reference: {[reference[s] for s in sorted(reference)]}")
    assert not mismatched, mismatched
    # Three attempts: fresh, resumed from step 2 (after the crashed save of 4), resumed from step 6.
    assert [r["step"] for r in start_records(out)] == [0, SAVE_EVERY, 6]
    logs = recovery_runs["faulted_proc"].stdout + recovery_runs["faulted_proc"].stderr
    assert f"resumed from {out / 'step_6'} at step 6" in logs
    assert (out / "latest").read_text().strip() == f"step_{STEPS}"
    # Steps 3..4 and 7 were run twice (lost work redone), never skipped.
    counts = {s: sum(r["step"] == s for r in records) for s in range(1, STEPS + 1)}
    assert counts[3] == counts[4] == 2 and counts[8] == 1, counts


@pytest.mark.slow
def test_crash_during_save_keeps_the_previous_checkpoint(recovery_runs):
    """Item 2: SIGKILL after the shards of step_4 were written into .tmp_step_4, before the rename: the
    restarted job resumed from step_2 (never from the unfinished folder) and removed .tmp_step_4."""
    from recipes_core.checkpoint import find_latest, is_complete

    out = recovery_runs["faulted"]
    marker = (out / f".fault_kill_in_save_{KILL_IN_SAVE}").read_text().splitlines()
    written = set(marker[1:])
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= written, marker  # killed after the shards
    assert "train_params.yaml" not in written
    logs = recovery_runs["faulted_proc"].stdout + recovery_runs["faulted_proc"].stderr
    assert f"resumed from {out / f'step_{SAVE_EVERY}'} at step {SAVE_EVERY}" in logs
    assert f"removed {out / f'.tmp_step_{KILL_IN_SAVE}'}" in logs
    assert not list(out.glob(".tmp_step_*"))
    assert all(is_complete(out / f"step_{s}") for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    assert find_latest(out) == out / f"step_{STEPS}"


def test_unfinished_save_is_never_chosen(tmp_path):
    """find_latest (what resume=auto uses) passes over .tmp_step_* and a step folder whose shard is
    short or missing, and preflight removes the stale temporary folder on the next start."""
    import shutil

    import torch
    import torch.distributed.checkpoint as dcp

    from recipes_core.checkpoint import find_latest, remove_unfinished_saves, tmp_step_dir

    def save(name: str) -> Path:
        dcp.save({"model": {"w": torch.arange(1000.0)}}, checkpoint_id=str(tmp_path / name), no_dist=True)
        (tmp_path / name / "train_params.yaml").write_text("step: 0\n")
        return tmp_path / name

    save("step_2")
    tmp = save(tmp_step_dir(tmp_path, 4).name)  # complete-looking, but never renamed
    (tmp_path / "latest").write_text("step_2\n")
    assert find_latest(tmp_path) == tmp_path / "step_2"
    shutil.copytree(tmp, tmp_path / "step_6")
    shard = next((tmp_path / "step_6").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated shard
    (tmp_path / "latest").write_text("step_6\n")
    assert find_latest(tmp_path) == tmp_path / "step_2"
    assert remove_unfinished_saves(tmp_path) == [tmp] and not tmp.exists()


# ----- damaged checkpoints and the date a chat template renders ----------------------------------------
# Llama 3.1+ templates put today's date in the system header ("Today Date: 03 Dec 2026", from
# strftime_now unless `date_string` is given). The tiny tokenizer gets such a template here.

DATED_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
    "{%- endif %}{%- endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n'"
    " + 'Today Date: ' + date_string + '<|eot_id|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DAYS_LATER = 400


def faketime_env(days: int) -> dict:
    """libfaketime (the `libfaketime` package bundles the preload library): the child's wall clock runs
    `days` later; monotonic clocks (timeouts) are left alone."""
    import libfaketime

    _, additions = libfaketime.get_reload_information()
    return {**additions, "FAKETIME": f"+{days}d", "DONT_FAKE_MONOTONIC": "1"}


@pytest.fixture(scope="module")
def dated_tokenizer(tiny_models, tmp_path_factory) -> Path:
    from recipes_core.tokens import load_tokenizer

    tokenizer = load_tokenizer(tiny_models["instruct"])
    tokenizer.chat_template = DATED_TEMPLATE
    folder = tmp_path_factory.mktemp("dated_tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def test_the_template_date_changes_the_tokens(dated_tokenizer):
    """Why the date must be fixed: the same conversation, rendered on two days, is two token sequences."""
    from recipes_core.data import load_records
    from recipes_core.preprocess import tokenize_chat
    from recipes_core.tokens import load_tokenizer

    tokenizer = load_tokenizer(dated_tokenizer)
    record = load_records(REPO / "cookbook" / "data" / "chat_train.jsonl", "chat")[0]
    today, later = (tokenize_chat(record, tokenizer, chat_date=d)["input_ids"] for d in ("03 Dec 2026", "07 Jan 2028"))
    assert today != later
    assert tokenize_chat(record, tokenizer, chat_date="03 Dec 2026")["input_ids"] == today


@pytest.fixture(scope="module")
def dated_straight_run(tiny_models, dated_tokenizer, tmp_path_factory) -> dict:
    """8 steps on 2 ranks with the dated template, checkpoints at 2, 4, 6, 8 (today's clock)."""
    out = tmp_path_factory.mktemp("dated") / "straight"
    overrides = [f"model.tokenizer={dated_tokenizer}", "data.max_seq_len=96"]  # the system header: ~20 tokens
    torchrun(2, out, tiny_models["instruct"], overrides)
    return {"out": out, "overrides": overrides}


@pytest.mark.slow
def test_damaged_checkpoints_fall_back_and_a_later_day_resumes_exactly(dated_straight_run, tiny_models, tmp_path):
    """A copy of the straight run with step_8's train_params.yaml invalid YAML, step_6's a plain string
    and `latest` binary garbage: resume=auto warns once per damaged file and resumes from step_4, on a
    clock 400 days later; steps 5..8 must log exactly the straight run's losses (the saved date is
    re-used; with today's date the system header, hence every loss, would differ)."""
    straight = dated_straight_run["out"]
    chat_date = yaml.safe_load((straight / "config.yaml").read_text())["data"]["chat_date"]
    assert chat_date and yaml.safe_load((straight / "step_2" / "train_params.yaml").read_text())[
        "config"]["data"]["chat_date"] == chat_date
    run = tmp_path / "run"
    run.mkdir()
    for name in ("step_2", "step_4", "step_6", "step_8"):
        shutil.copytree(straight / name, run / name)
    (run / "step_8" / "train_params.yaml").write_text("config: {data: [unclosed\n")
    (run / "step_6" / "train_params.yaml").write_text("just a string\n")
    (run / "latest").write_bytes(b"\xff\xfe\x00garbage\x9c")

    env = child_env(**faketime_env(DAYS_LATER))
    later = subprocess.run([sys.executable, "-c", "import datetime; print(datetime.date.today())"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    import datetime

    assert later == str(datetime.date.today() + datetime.timedelta(days=DAYS_LATER)), later  # the clock moved
    proc = torchrun(2, run, tiny_models["instruct"], dated_straight_run["overrides"], env=env)
    logs = proc.stdout + proc.stderr
    warnings = [line for line in logs.splitlines() if line.startswith("WARNING: resume=auto")]
    for damaged in (run / "latest", run / "step_8" / "train_params.yaml", run / "step_6" / "train_params.yaml"):
        assert sum(str(damaged) in line for line in warnings) == 1, (damaged, warnings)
    assert f"resumed from {run / 'step_4'} at step 4" in logs
    assert "Traceback" not in logs
    reference = {r["step"]: r["loss"] for r in train_records(straight)}
    resumed = {r["step"]: r["loss"] for r in train_records(run)}
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["chat_date"] == chat_date


DAMAGE = {
    # name: (damage to a copy of a run folder, the file the error must name)
    "train_params.yaml invalid YAML": (lambda run: (run / "step_1" / "train_params.yaml").write_text("a: [b\n"),
                                       "step_1/train_params.yaml"),
    "train_params.yaml a plain string": (lambda run: (run / "step_1" / "train_params.yaml").write_text("hello\n"),
                                         "step_1/train_params.yaml"),
    "latest binary garbage": (lambda run: (run / "latest").write_bytes(b"\x80\xff\x00\x9c"), "run/latest"),
    "latest names no folder": (lambda run: (run / "latest").write_text("step_99\n"), "run/latest"),
}


@pytest.fixture(scope="module")
def small_run(tiny_models, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    from conftest import write_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["instruct"]))
    run = tmp_path_factory.mktemp("small") / "run"
    write_checkpoint(model, run, tiny_models["instruct"], step=1)
    return run


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_checkpoint_given_by_path_is_one_error(name, small_run, tmp_path, capsys):
    """convert and infer: exit 2, one `error:` line naming the damaged file, no traceback, nothing written
    or changed. doctor checkpoint reports the same file as a FAILED check (exit 1, its report contract)."""
    import hashlib

    from recipes_core.convert import main as convert
    from recipes_core.doctor import main as doctor
    from recipes_core.infer import main as infer

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    damage, needle = DAMAGE[name]
    damage(run)
    target = run / "step_1" if "train_params" in name else run
    before = {p: hashlib.sha256(p.read_bytes()).digest() for p in run.rglob("*") if p.is_file()}
    for command, args in ((convert, [str(target), str(tmp_path / "hf")]), (infer, [str(target), "--prompt", "hi"])):
        assert exit_code(command, args) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert doctor(["checkpoint", str(target)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and any(needle in line and "[error]" in line for line in out.splitlines()), out
    assert not (tmp_path / "hf").exists()
    assert {p: hashlib.sha256(p.read_bytes()).digest() for p in run.rglob("*") if p.is_file()} == before


def test_choose_latest_says_why_it_passed_a_step_over(small_run, tmp_path):
    """What resume=auto uses: a `latest` naming a missing folder falls back to the newest complete step."""
    from recipes_core.checkpoint import choose_latest

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "latest").write_text("step_99\n")
    chosen, notes = choose_latest(run)
    assert chosen == run / "step_1" and len(notes) == 1 and "step_99, which does not exist" in notes[0]
