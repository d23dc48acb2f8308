"""W&B (offline) and MLflow (local file store) receive the run's metrics: a real one-rank fine-tune in this
process with log.wandb=true log.mlflow=true, read back from the files they wrote (MLflow's client on the
file store; the records of W&B's offline run file) and compared with metrics.jsonl. (Resuming into the same
runs through trackers.json is not repeated here: a second run would cost another ~15 s of the test budget.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes_core.config import load_config
from recipes_core.finetune import run
from recipes_core.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = ["data.format=chat", "data.train_path=cookbook/data/chat_train.jsonl",
             "data.eval_path=cookbook/data/chat_eval.jsonl", "data.max_seq_len=96", "data.max_train_examples=16",
             "data.max_eval_examples=4", "train.micro_batch_size=4", "train.grad_accum_steps=1",
             "train.eval_every=2", "checkpoint.save_final=false",
             "log.progress_bar=false", "log.tensorboard=false", "log.peak_flops=1e12",
             "log.wandb=true", "log.mlflow=true", "log.experiment=cookbook-test"]


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (.wandb: a LevelDB-style log of 32 KiB blocks after a 7-byte
    header; each chunk has a 7-byte header: crc32c, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finetune(out: Path, model: Path, steps: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(load_config(REPO / "cookbook" / "tiny_full.yaml",
                               [*OVERRIDES, "model.source=hf", f"model.path={model}", f"train.max_steps={steps}",
                                f"checkpoint.output_dir={out}"]))
    finally:
        torch.set_num_threads(threads)


def test_wandb_offline_and_mlflow_file_store(tiny_models, tmp_path, monkeypatch):
    # wandb and mlflow-skinny are in the dev extras (make install): missing, this test fails, it does not skip
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    finetune(out, tiny_models["instruct"], steps=3)
    ids = json.loads((out / "trackers.json").read_text())

    train = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl", "train")}
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(out / "metrics.jsonl", "eval")}
    assert sorted(train) == [1, 2, 3] and sorted(evals) == [2, 3]

    from mlflow.tracking import MlflowClient

    client = MlflowClient((out / "mlruns").resolve().as_uri())
    mlflow_run = client.get_run(ids["mlflow"])
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "cookbook-test"
    assert mlflow_run.data.params["train.max_steps"] == "3"  # the run's config
    assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "train/loss")} == pytest.approx(train)
    assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "eval/eval_loss")} == pytest.approx(evals)
    assert mlflow_run.info.status == "FINISHED"

    logged = {}
    run_files = sorted((out / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(run_files) == 1
    for path in run_files:
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                if "train/loss" in items:
                    logged[items["_step"]] = items["train/loss"]
    assert logged == pytest.approx(train)
