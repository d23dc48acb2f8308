"""Experiment trackers beside metrics.jsonl: Weights & Biases (offline) and MLflow (a local file store).

Both are optional, like TensorBoard: `log.wandb=true` / `log.mlflow=true` in the config, rank 0 only,
imported only when turned on (config.config_errors names the missing package in one line before the run).
Everything stays under the run's output folder and nothing goes over the network:
  <output_dir>/wandb/offline-run-*/   W&B offline run (mode offline unless WANDB_MODE says otherwise);
                                      `wandb sync <that folder>` uploads it later
  <output_dir>/mlruns/                MLflow file store (or MLFLOW_TRACKING_URI when set); browse it with
                                      `mlflow ui --backend-store-uri <output_dir>/mlruns`
  <output_dir>/trackers.json          the run ids, so a resumed run (checkpoint.resume) continues the same
                                      W&B and MLflow runs
Metric names are "<kind>/<key>" (train/loss, eval/loss, ...) at the optimizer step; the config is logged
as the runs' config / params.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from pathlib import Path

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # config key -> module (pip: wandb, mlflow-skinny or mlflow)
IDS_FILE = "trackers.json"


def missing_package(tracker: str) -> str | None:
    """Why log.<tracker>=true cannot run here (None when the package is installed)."""
    if importlib.util.find_spec(PACKAGES[tracker]) is None:
        pip_name = "mlflow-skinny (or mlflow)" if tracker == "mlflow" else "wandb"
        return (f"log.{tracker}=true needs the {PACKAGES[tracker]} package, which is not installed: "
                f"pip install {pip_name}, or set log.{tracker}=false")
    return None


def _numbers(record: dict) -> dict[str, float]:
    """The record's numeric fields (not step, not flags) as "<kind>/<key>"."""
    kind = record.get("kind", "train")
    return {f"{kind}/{key}": float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class WandbTracker:
    def __init__(self, out_dir: Path, experiment: str, run_config: dict, run_id: str | None):
        import wandb

        self.run = wandb.init(project=experiment, dir=str(out_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                              config=run_config, id=run_id or uuid.uuid4().hex[:8], resume="allow",
                              name=out_dir.name, settings=wandb.Settings(silent=True, console="off"))
        self.id = self.run.id

    def log(self, record: dict) -> None:
        numbers = _numbers(record)
        if numbers:
            self.run.log(numbers, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, out_dir: Path, experiment: str, run_config: dict, run_id: str | None):
        # MLflow 3 keeps the file store in maintenance mode and refuses it unless told; a local folder is what
        # a run needs here (no server, no database). MLFLOW_TRACKING_URI, when set, wins.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=out_dir.name).info.run_id
            for key, value in sorted(_flat(run_config).items()):
                self.client.log_param(run_id, key, value[:6000])  # MLflow's limit on a param value
        self.id = run_id

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, value in _numbers(record).items():
            self.client.log_metric(self.id, key, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.id)


TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def open_trackers(out_dir: str | Path, names: list[str], experiment: str, run_config: dict,
                  resume: bool) -> list:
    """Start (or, on resume, continue) the named trackers for a run writing to out_dir; rank 0 only."""
    out_dir = Path(out_dir)
    ids_path = out_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
    trackers = []
    for name in names:
        problem = missing_package(name)
        if problem:  # config_errors catches this first; a tracker is never silently dropped
            raise ImportError(problem)
        trackers.append(TRACKERS[name](out_dir, experiment, run_config, ids.get(name)))
        ids[name] = trackers[-1].id
    if trackers:
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    return trackers
