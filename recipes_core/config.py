"""Training configuration: plain dataclasses, filled from a YAML file and then `section.key=value` overrides.

    python -m recipes_core.finetune --config cookbook/tiny_full.yaml train.lr=3e-4 checkpoint.resume=auto

Why dataclasses and not a config framework: a reader sees every option, its type and its default in one
file, and a typo is caught before any model is loaded. An unknown key is an error that names the
nearest valid one (difflib), because a silently ignored `train.learning_rate=...` wastes a whole run.
"""

from __future__ import annotations

from recipes_core.errors import UserError
from recipes_core.preprocess import CLASSIFICATION_LABEL_WORDS, CLASSIFICATION_PROMPT, check_classification_task
from recipes_core.trackers import missing_package

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    source: str = "tiny"  # tiny | hf (local folder) | hub (name, needs network) | gguf (file)
    path: str = ""  # folder, hub name or .gguf file; for tiny: where to build it (default runs/cache/tiny)
    tiny_variant: str = "instruct"  # tiny only: base | instruct
    tokenizer: str = ""  # a different tokenizer folder; empty = the model's own
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    format: str = "alpaca"  # alpaca | chat | classification
    train_path: str = "cookbook/data/alpaca_train.jsonl"
    eval_path: str = "cookbook/data/alpaca_eval.jsonl"
    max_seq_len: int = 256
    train_on_inputs: bool = False
    packing: bool = False  # pack examples into blocks of max_seq_len tokens instead of padding
    max_train_examples: int = 0  # 0 = all; small numbers make quick tests
    max_eval_examples: int = 0
    shuffle: bool = True
    # The date a chat template renders (Llama 3.1+ put "Today Date: 26 Jul 2024" in the system header, from
    # `date_string`, else today's date). "" = today, chosen once at the start of a run and saved with it
    # (config.yaml, each checkpoint's train_params.yaml); a resume re-uses the saved one, so the same data
    # tokenizes the same on any day.
    chat_date: str = ""
    # classification only: the prompt ({sentence1}, {sentence2} filled in from each row) and the word that
    # answers each label (label k -> label_words[k]; the leading space is part of the word). The defaults
    # ask the paraphrase question of the PAWS-X-shaped data; recipes_core.classify takes the same two.
    classification_prompt: str = CLASSIFICATION_PROMPT
    label_words: list[str] = field(default_factory=lambda: list(CLASSIFICATION_LABEL_WORDS))


@dataclass
class TrainConfig:
    seed: int = 42
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run the epochs to the end
    stop_after_steps: int = 0  # end this job early (e.g. a SLURM time limit), checkpoint, resume later;
    #                            the schedule still spans max_steps. 0 = run to the end
    micro_batch_size: int = 4  # examples per rank per forward/backward
    grad_accum_steps: int = 1  # micro-batches per optimizer step; global batch = micro * accum * ranks
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | linear | constant (after the warmup)
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 = no clipping
    eval_every: int = 0  # optimizer steps between evaluations; 0 = only at the end
    max_eval_batches: int = 0  # 0 = the whole eval set
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) and what it needs
    # Chunked cross-entropy (recipes_core.loss): the lm_head and the loss run on this many tokens at a time,
    # so only one chunk's logits are ever in memory (recomputed in backward: the lm_head matmul runs twice).
    # Applies to micro-batches with more tokens than this (micro_batch_size x padded length); 0 = off. Same
    # loss and gradients as the plain loss up to summation order (tests/test_loss.py).
    # Measured (benchmarks/chunked_loss.py, RESULTS.md section 9: SmolLM2, one micro-batch of 2048 tokens per rank,
    # fp32 CPU, the launcher's mimalloc, peak RSS above the runtime baseline, 3 rounds, median (min-max)): chunks of
    # 256 tokens with activation checkpointing, 2 ranks 0.645x (0.644-0.647) the plain loss's peak, 1 rank 0.79x
    # (0.787-0.790); without it, 2 ranks 0.84x (0.836-0.838). The logits are each rank's whole-micro-batch item
    # while the weights, gradients and AdamW states shrink with the ranks, so the saving weighs more with more
    # ranks, with vocabulary x tokens (Llama 3: 128k vocabulary), and once activation checkpointing has removed the
    # activations. It costs a second lm_head matmul (the step 1.04x as long with checkpointing, 0.94x without), so
    # it is off by default (the tiny and SmolLM2 recipes' micro-batches are 512-1024 tokens: SmolLM2's would save
    # 13% by the planner) and on in the Llama 3.x recipes (1024).
    loss_chunk_size: int = 0
    # torch.compile each decoder layer (inductor: C++ kernels on CPU, Triton on CUDA; preflight checks that the
    # compiler is there). The first step compiles (tens of seconds, longer on a busy CPU; later runs reuse
    # inductor's on-disk cache), later steps run fused kernels; the first micro-batch of a new length compiles
    # once more, for dynamic shapes (data.packing=true keeps one length). FSDP's all-gathers and reduce-scatters stay
    # outside the compiled graphs. Losses equal eager ones up to summation order (tests/test_compile.py);
    # speed: benchmarks/compile_speed.py.
    compile: bool = False


@dataclass
class FSDPConfig:
    sharding: str = "full"  # full (FSDP over all ranks) | hybrid (HSDP: replicate x shard 2-D mesh)
    replicate_degree: int = 0  # hybrid only: number of replica groups; 0 = number of nodes
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    # CUDA: every tensor autograd keeps for backward goes to pinned host memory during forward and comes back
    # when backward needs it (torch.autograd.graph.save_on_cpu). GPU memory for activations falls to one
    # layer's working set; each saved tensor crosses PCIe twice, without overlapping compute. With
    # activation_checkpointing only each layer's input is kept, so offloading is cheap there. Ignored on CPU.
    activation_offload: bool = False
    # false: every layer keeps its gathered parameters from forward to backward: half the all-gathers
    # (the fewer-collectives setting where communication dominates) for the memory of a full model copy
    reshard_after_forward: bool = True
    # Gather each layer's parameters once per optimizer step instead of at every use: the first micro-batch's
    # forward all-gathers them, they stay gathered through all micro-batches (set_reshard_after_backward),
    # and the last backward reduce-scatters the summed gradients and frees them; reshard_after_forward no
    # longer applies. The numbers are bit-identical to off (tests/test_finetune.py).
    # Messages: all-gathers per step fall from accum x (2 x units - 2) to units (units = decoder layers + 1;
    # counted by benchmarks/comm_count.py, 2 ranks): SmolLM2 (30 layers) accum 4: 274 collectives -> 65
    # (3.5 GiB of all-gathers -> 0.5 GiB); accum 2: 154 -> 65; DDP: 16 bucketed all-reduces + 3 broadcasts.
    # Memory: every rank holds the whole model's parameters unsharded for the whole step, on top of its shard
    # (4 B/param fp32, 2 B bf16), like DDP, while the AdamW states and master weights stay sharded. (With
    # accumulation FSDP2 already holds the whole unsharded gradients between micro-batches, on or off.)
    # Measured, SmolLM2 fp32, 2 CPU ranks (gloo), accum 4, 3 interleaved rounds on a loaded machine (load average
    # 12-15, where each collective waits long for both ranks: expect a smaller gain on a quiet one): step time
    # on / off 0.41x (0.31-0.45); the step's peak RSS +309 / +336 MiB on rank 0 / 1 (+15% of a 2.1 GiB rank).
    # Tiny, accum 2 / 4: 24 / 40 collectives -> 13, step 0.60x (0.56-0.79) / 0.74x (0.63-0.85).
    # Default off: FSDP's memory arithmetic (recipes_core.plan), what a GPU whose memory is the limit needs, and
    # NCCL overlaps all-gathers with compute there. On for CPU recipes (cookbook/smollm2_full.yaml), where every
    # gloo collective is a rendezvous of ranks sharing cores and host memory is rarely the limit.
    gather_once_per_step: bool = False
    # With gradient accumulation FSDP2 skips the reduce-scatter until the last micro-batch and keeps every layer's
    # unsharded gradient (fp32) meanwhile: 4 bytes x all parameters on every rank, whatever the number of ranks
    # (measured, 40M model, 2 CPU ranks, accumulation 2: +133 MiB per rank, 4 x P = 139 MiB; Llama 3.1 8B: 30 GiB
    # per GPU, 70B: 263 GiB). true: reduce-scatter after every micro-batch instead: accumulation costs no memory,
    # each micro-batch pays one reduce-scatter per layer. The same sum in another order (tests/test_finetune.py).
    # On in the Llama 3.x recipes; off where the model is small and messages cost more than memory.
    reduce_every_micro_batch: bool = False
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo


@dataclass
class CheckpointConfig:
    output_dir: str = "runs/finetune"
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    save_final: bool = True
    save_optimizer: bool = True  # False: model only (a cold optimizer on resume)
    keep_last_n: int = 0  # 0 = keep all
    resume: str = ""  # "" (fresh start) | auto (latest under output_dir, if any) | path to a step_<k> folder


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class LogConfig:
    progress_bar: bool = True
    log_every: int = 1  # optimizer steps between metric lines
    tensorboard: bool = True  # used only when the tensorboard package is installed
    wandb: bool = False  # W&B run in offline mode under <output_dir>/wandb (rank 0; needs the wandb package)
    mlflow: bool = False  # MLflow run in a file store at <output_dir>/mlruns (rank 0; needs mlflow-skinny)
    experiment: str = "recipes_core"  # the W&B project and MLflow experiment name
    peak_flops: float = 0.0  # per device, for MFU; 0 = a known GPU peak, or a short matmul benchmark
    profile_steps: int = 0  # optimizer steps to record with torch.profiler after 2 warm-up steps; 0 = off


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)


class ConfigError(UserError, ValueError):
    """A config file or override that does not match the dataclasses; the message says what to use."""


def valid_keys(config: Config | None = None) -> list[str]:
    config = config or Config()
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(config)
            for f in dataclasses.fields(getattr(config, section.name))]


# Names other trainers use for the same thing; difflib alone would not find "lr" from "learning_rate".
ALIASES = {"learning_rate": "lr", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
           "gradient_accumulation_steps": "grad_accum_steps", "num_epochs": "epochs", "num_train_epochs": "epochs",
           "output": "output_dir", "warmup": "warmup_steps", "max_length": "max_seq_len"}


def _unknown(key: str, choices: list[str]) -> ConfigError:
    section, _, name = key.rpartition(".")
    aliased = [c for c in choices if name in ALIASES and c.endswith("." + ALIASES[name])]
    close = aliased or difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(choices)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert YAML values and override strings to the field's declared type."""
    hint = annotation
    origin = typing.get_origin(hint)
    if isinstance(value, str) and (hint in (int, float, bool) or origin in (list, tuple)):
        value = yaml.safe_load(value)  # "3e-4" -> 3e-4 needs care: YAML 1.1 reads it as a string
        if isinstance(value, str) and hint is float:
            try:
                value = float(value)
            except ValueError:
                pass
    try:
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
        if origin in (list, tuple):
            return origin(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _set(config: Config, key: str, value: Any) -> None:
    section_name, _, name = key.partition(".")
    if key not in valid_keys(config):
        raise _unknown(key, valid_keys(config))
    section = getattr(config, section_name)
    annotation = typing.get_type_hints(type(section))[name]
    setattr(section, name, _coerce(value, annotation, key))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (nested `section: {key: value}`), then `section.key=value` overrides."""
    config = Config()
    if path:
        raw = read_yaml(path, "--config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise _unknown(str(section), [f.name for f in dataclasses.fields(config)])
            for name, value in values.items():
                _set(config, f"{section}.{name}", value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        _set(config, key.strip(), value.strip())
    validate(config)
    return config


def read_yaml(path: str | Path, what: str):
    """A YAML file's content; a missing file, bad bytes or a syntax error is a ConfigError naming the
    file and the line (YAML indents with spaces: a tab is the usual cause)."""
    path = Path(path)
    if not path.is_file():
        why = "it is a folder" if path.is_dir() else "no such file"
        raise ConfigError(f"{what} {path}: {why}; check the path (relative paths start from the folder "
                          "the command runs in)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          "save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        tab = "; YAML indents with spaces, never tabs" if "\t" in path.read_text(encoding="utf-8") else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}{tab}") from None


def config_errors(config: Config) -> list[str]:
    """Every value the dataclass types admit but no run can use. The one place config values are checked:
    load_config raises the first, and preflight checks configs built in code the same way."""
    errors = []
    choices = {"model.source": ("tiny", "hf", "hub", "gguf"), "data.format": ("alpaca", "chat", "classification"),
               "train.lr_schedule": ("cosine", "linear", "constant"), "fsdp.sharding": ("full", "hybrid"),
               "fsdp.mixed_precision": ("auto", "bf16", "fp32"), "fsdp.backend": ("auto", "nccl", "gloo"),
               "model.tiny_variant": ("base", "instruct")}
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            errors.append(f"{key}={value!r}; choose one of {list(allowed)}")
    for key in ("train.micro_batch_size", "train.grad_accum_steps", "train.epochs"):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 1:
            errors.append(f"{key} must be at least 1")
    if config.data.max_seq_len < 2:  # token t predicts token t+1: one token has nothing to predict
        errors.append(f"data.max_seq_len={config.data.max_seq_len} must be at least 2 (a token is trained to "
                      "predict the next one); use the longest example's length, e.g. 256")
    if config.data.format == "classification":
        try:
            check_classification_task(config.data.classification_prompt, config.data.label_words)
        except ValueError as err:
            errors.append(f"data.classification_prompt / data.label_words: {err}")
    if config.model.source != "tiny" and not config.model.path:
        errors.append(f"model.source={config.model.source} needs model.path")
    positive = {"train.lr": config.train.lr}
    non_negative = {"train.max_steps": config.train.max_steps, "train.stop_after_steps": config.train.stop_after_steps,
                    "train.warmup_steps": config.train.warmup_steps, "train.weight_decay": config.train.weight_decay,
                    "train.max_grad_norm": config.train.max_grad_norm, "train.eval_every": config.train.eval_every,
                    "checkpoint.save_every": config.checkpoint.save_every,
                    "checkpoint.keep_last_n": config.checkpoint.keep_last_n,
                    "fsdp.replicate_degree": config.fsdp.replicate_degree,
                    "train.loss_chunk_size": config.train.loss_chunk_size,
                    "data.max_train_examples": config.data.max_train_examples}
    errors += [f"{key}={value} must be greater than 0" for key, value in positive.items() if not value > 0]
    errors += [f"{key}={value} must not be negative" for key, value in non_negative.items() if value < 0]
    if not 0 <= config.train.min_lr_ratio <= 1:
        errors.append(f"train.min_lr_ratio={config.train.min_lr_ratio} must be between 0 and 1")
    if not all(0 <= b < 1 for b in config.train.betas) or len(config.train.betas) != 2:
        errors.append(f"train.betas={list(config.train.betas)} must be two numbers in [0, 1)")
    for tracker in ("wandb", "mlflow"):
        if getattr(config.log, tracker) and missing_package(tracker):
            errors.append(missing_package(tracker))
    if (config.log.wandb or config.log.mlflow) and not config.log.experiment.strip():
        errors.append("log.experiment is empty; name the W&B project / MLflow experiment, e.g. recipes_core")
    if config.lora.enabled and config.lora.r < 1:
        errors.append(f"lora.r={config.lora.r} must be at least 1")
    return errors


def validate(config: Config) -> None:
    """Raise ConfigError with the first of config_errors (a typo costs a second, not a run)."""
    errors = config_errors(config)
    if errors:
        raise ConfigError(errors[0])


def to_dict(config: Config) -> dict:
    """Plain dict (tuples as lists) for YAML, JSON and train_params.yaml."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def from_dict(data: dict) -> Config:
    """The inverse of to_dict (e.g. the `config` entry of a checkpoint's train_params.yaml)."""
    config = Config()
    for section, values in data.items():
        for name, value in values.items():
            _set(config, f"{section}.{name}", value)
    return config


def dump(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
