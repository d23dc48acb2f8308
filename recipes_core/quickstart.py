"""The quickstart: the whole pipeline on the tiny model, on CPU, in a few minutes.

    python -m recipes_core.quickstart [--out runs/quickstart] [--steps 100] [--eval-prompts 100] [--prepare-only]

1. generate the datasets and build the tiny base/instruct models
2. score the held-out chat prompts with the instruct model as built (greedy exact match)
3. fine-tune it on two ranks with FSDP (torchrun -m recipes_core.finetune, recipes_core/configs/quickstart.yaml)
4. convert the sharded checkpoint to a Hugging Face folder and verify its logits
5. score the held-out prompts again with the converted folder; print both accuracies and the paths

Everything it reads ships with the package (the dataset generator, the tiny model's corpus, the config), so
an installed recipes_core runs it from any folder; the data is written to <out>/data unless --data is given.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recipes_core.config import load_config
from recipes_core.convert import convert
from recipes_core.errors import UsageError, command
from recipes_core.data import load_records
from recipes_core.launch import launch_command
from recipes_core.paths import refuse_overlap
from recipes_core.infer import generate, infer_command, load_for_inference
from recipes_core.synthetic_data import write_all
from recipes_core.tiny import build_tiny

CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"  # package data (pyproject.toml)
EXAMPLE_PROMPT = "Give the first item of the list.\nmango, bridge, wolf"  # a held-out-style chat prompt


def held_out(data_dir: Path, n: int) -> tuple[list[list[dict]], list[str]]:
    """(conversations up to their last user turn, the expected last answer) from chat_eval.jsonl."""
    prompts, answers = [], []
    for record in list(load_records(data_dir / "chat_eval.jsonl", "chat"))[:n]:
        messages = record["messages"]
        prompts.append(messages[:-1])
        answers.append(messages[-1]["content"])
    return prompts, answers


def score(model_dir: Path, prompts: list, expected: list[str]) -> tuple[float, list[str]]:
    """Greedy exact-match accuracy through the chat template, and the answers."""
    model, tokenizer = load_for_inference(model_dir)
    answers = generate(model, tokenizer, prompts, mode="chat", max_new_tokens=8, batch_size=50)
    correct = sum(a.strip().lower() == e.strip().lower() for a, e in zip(answers, expected))
    return correct / len(expected), answers


def finetune_args(model_dir: Path, data_dir: Path, output_dir: Path, steps: int) -> list[str]:
    """The trainer's arguments: the packaged config, with this run's model, data and output folders."""
    return ["--config", str(CONFIG), "model.source=hf", f"model.path={model_dir}", f"checkpoint.output_dir={output_dir}",
            f"data.train_path={data_dir / 'chat_train.jsonl'}", f"data.eval_path={data_dir / 'chat_eval.jsonl'}",
            f"train.max_steps={steps}"]


def finetune(model_dir: Path, data_dir: Path, output_dir: Path, steps: int, nproc: int, log_path: Path) -> None:
    """torchrun the trainer; print a progress line from its metrics file every few steps."""
    # torchrun --nproc_per_node N -m recipes_core.finetune ... on a free port
    command = launch_command(nproc, "recipes_core.finetune", finetune_args(model_dir, data_dir, output_dir, steps))
    metrics = output_dir / "metrics.jsonl"
    seen = 0
    with open(log_path, "w") as log:
        # every path is absolute: the trainer runs in the output folder, not in a source checkout
        process = subprocess.Popen(command, cwd=output_dir.parent, stdout=log, stderr=subprocess.STDOUT)
        running = True
        while running:
            running = process.poll() is None
            time.sleep(1 if running else 0)
            records = _complete_records(metrics)[seen:]
            seen += len(records)
            for record in records:
                if record.get("kind") == "train" and (record["step"] % 10 == 0 or record["step"] == steps):
                    print(f"      step {record['step']:>4}/{steps}  loss {record['loss']:.3f}", flush=True)
    if process.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"fine-tuning failed (exit {process.returncode}); log {log_path}:\n{tail}")


def _complete_records(path: Path) -> list[dict]:
    """The JSON lines written so far (a line still being written is left for the next look)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def run(out: Path, data_dir: Path, steps: int = 100, eval_prompts: int = 100, nproc: int = 2,
        prepare_only: bool = False) -> dict:
    """The pipeline; returns (and writes to out/summary.json) the accuracies, times and paths.
    prepare_only: stop after step 1 (data, models, and the fine-tuning config loaded and checked)."""
    started = time.perf_counter()
    out, data_dir = out.resolve(), data_dir.resolve()  # the trainer runs in another folder
    out.mkdir(parents=True, exist_ok=True)
    print("[1/5] generating the datasets and building the tiny models ...", flush=True)
    write_all(data_dir)
    instruct = build_tiny(out / "models")["instruct"]  # its tokenizer's corpus is generated in memory
    prompts, expected = held_out(data_dir, eval_prompts)
    if prepare_only:
        load_config(CONFIG, finetune_args(instruct, data_dir, out / "checkpoints", steps)[2:])  # raises if wrong
        return {"models": str(out / "models"), "data": str(data_dir), "config": str(CONFIG),
                "eval_prompts": len(prompts)}

    print(f"[2/5] scoring {len(prompts)} held-out chat prompts before fine-tuning ...", flush=True)
    before, _ = score(instruct, prompts, expected)
    print(f"      accuracy before: {before:.1%}", flush=True)

    print(f"[3/5] fine-tuning on {nproc} ranks with FSDP for {steps} steps ...", flush=True)
    checkpoints, hf_dir = out / "checkpoints", out / "hf"
    # Removed before the run (a fresh start), so it must hold none of this run's inputs.
    refuse_overlap(checkpoints, {"the data folder": data_dir, "the model folder": instruct}, "--out's checkpoints")
    shutil.rmtree(checkpoints, ignore_errors=True)
    finetune(instruct, data_dir, checkpoints, steps, nproc, out / "finetune.log")

    print("[4/5] converting the sharded checkpoint to a Hugging Face folder and verifying it ...", flush=True)
    result = convert(checkpoints, hf_dir, verify=True, overwrite=True)
    print(f"      {result.checkpoint.name} -> {hf_dir}: max |logits difference| {result.max_abs_diff:.2g}", flush=True)

    print(f"[5/5] scoring the held-out prompts with {hf_dir} ...", flush=True)
    after, answers = score(hf_dir, prompts, expected)
    with open(out / "answers.jsonl", "w") as f:
        for messages, answer, gold in zip(prompts, answers, expected):
            f.write(json.dumps({"prompt": messages[-1]["content"], "answer": answer, "expected": gold}) + "\n")
    summary = {"accuracy_before": before, "accuracy_after": after, "eval_prompts": len(prompts), "steps": steps,
               "verify_max_abs_diff": result.max_abs_diff, "wall_s": round(time.perf_counter() - started, 1),
               "models": str(out / "models"), "checkpoint": str(result.checkpoint), "hf": str(hf_dir),
               "answers": str(out / "answers.jsonl"), "finetune_log": str(out / "finetune.log"),
               "metrics": str(checkpoints / "metrics.jsonl")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def next_steps(summary: dict) -> str:
    """The commands to try next on the run's folder, quoted for the shell: the example prompt's newline
    reaches the model as a newline, as in the training data (tests/test_quickstart.py runs it in bash)."""
    return (f"next: {infer_command(summary['hf'], EXAMPLE_PROMPT)}\n"
            f"      python -m recipes_core.doctor model {shlex.quote(summary['hf'])}")


@command  # bad input -> one `error:` line, exit 2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes_core.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--data", default=None, help="where the datasets are written (default: OUT/data)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the data and build the tiny models, check the fine-tuning config, and stop")
    args = parser.parse_args(argv)
    for option in ("steps", "eval_prompts", "nproc"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} {getattr(args, option)}: must be at least 1")
    data = Path(args.data) if args.data else Path(args.out) / "data"
    summary = run(Path(args.out), data, args.steps, args.eval_prompts, args.nproc, args.prepare_only)
    if args.prepare_only:
        print(f"prepared: data {summary['data']}, models {summary['models']}, config {summary['config']}")
        return 0
    print(f"\nheld-out exact match: {summary['accuracy_before']:.1%} before -> {summary['accuracy_after']:.1%} "
          f"after fine-tuning ({summary['eval_prompts']} prompts), in {summary['wall_s']:.0f} s")
    for row in [json.loads(line) for line in Path(summary["answers"]).read_text().splitlines()[:3]]:
        print(f"  {row['prompt']!r} -> {row['answer']!r} (expected {row['expected']!r})")
    for key in ("models", "checkpoint", "hf", "answers", "finetune_log", "metrics"):
        print(f"  {key:<13}{summary[key]}")
    print("\n" + next_steps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
