"""Checks that catch the known pitfalls before they cost a training run.

Each check returns a Report (findings with a level) so a notebook can show it and a command can print
it; `python -m recipes_core.doctor` is the command-line front end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recipes_core import IGNORE_INDEX


@dataclass
class Finding:
    level: str  # "error", "warning" or "info"
    message: str


@dataclass
class Report:
    title: str
    findings: list[Finding] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def add(self, level: str, message: str) -> None:
        self.findings.append(Finding(level, message))

    @property
    def errors(self) -> list[str]:
        return [f.message for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[str]:
        return [f.message for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        lines = [f"== {self.title}: {'OK' if self.ok else 'FAILED'}"]
        lines += [f"  {key}: {value}" for key, value in self.stats.items()]
        lines += [f"  [{f.level}] {f.message}" for f in self.findings]
        return "\n".join(lines)


def _rows(indices: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def check_tokenized(examples: list[dict], vocab_size: int, end_ids: list[int], title: str = "data") -> Report:
    """Report on tokenized examples ({"input_ids", "labels", "truncated"?}); rows are 1-based.

    Errors: a label below 0 other than -100 (e.g. the -1 sentinel), or at/above the vocabulary size.
    Warnings: examples with no supervised token, examples whose last supervised token is not an end
    token (the model never learns to stop), truncated examples.
    """
    report = Report(title)
    total = supervised = 0
    bad_negative, out_of_range, unsupervised, no_end, truncated, misaligned = [], [], [], [], [], []
    for row, example in enumerate(examples, start=1):
        ids, labels = example["input_ids"], example["labels"]
        if len(ids) != len(labels):
            misaligned.append(row)
            continue
        total += len(labels)
        kept = [label for label in labels if label != IGNORE_INDEX]
        supervised += len(kept)
        if any(label < 0 for label in kept):
            bad_negative.append(row)
        if any(label >= vocab_size for label in kept):
            out_of_range.append(row)
        if not kept:
            unsupervised.append(row)
        elif kept[-1] not in end_ids:
            no_end.append(row)
        if example.get("truncated"):
            truncated.append(row)
    report.stats = {"examples": len(examples), "tokens": total, "supervised tokens": supervised,
                    "supervised fraction": round(supervised / total, 4) if total else 0.0,
                    "examples with no supervised token": len(unsupervised), "truncated examples": len(truncated)}
    if misaligned:
        report.add("error", f"labels and input_ids differ in length in rows {_rows(misaligned)}")
    if bad_negative:
        report.add("error", f"negative labels other than {IGNORE_INDEX} in rows {_rows(bad_negative)}: "
                            f"cross-entropy ignores only {IGNORE_INDEX}; mask with {IGNORE_INDEX}, never -1")
    if out_of_range:
        report.add("error", f"labels >= vocabulary size {vocab_size} in rows {_rows(out_of_range)}: "
                            "the data was tokenized with another tokenizer, or the model's vocabulary is too small")
    if unsupervised:
        report.add("warning", f"{len(unsupervised)} examples have no supervised token (rows {_rows(unsupervised)}); "
                              "they cost compute and teach nothing (answer truncated away, or masked entirely)")
    if no_end:
        report.add("warning", f"{len(no_end)} examples do not end their supervised part with an end token "
                              f"{end_ids} (rows {_rows(no_end)}): the model will not learn to stop")
    if truncated:
        report.add("warning", f"{len(truncated)} examples were truncated to max_seq_len (rows {_rows(truncated)})")
    return report


def untrainable_errors(examples: list[dict], source: str, length_setting: str | None = None,
                       embedding_rows: int | None = None, tokenizer=None) -> list[str]:
    """What makes tokenized data untrainable, for preflight (before a run) and `doctor data` alike: no
    example keeps a supervised token (labels are shifted by one, so position 0 never counts), or a token id
    has no row in the model's embedding (training would die in F.embedding with an IndexError)."""
    errors = []
    if examples and not any(label != IGNORE_INDEX for e in examples for label in e["labels"][1:]):
        limit = f" with {length_setting}" if length_setting else ""
        errors.append(f"{source}: no example keeps a supervised token{limit} (every answer is masked or truncated "
                      "away), so there is nothing to learn; raise the sequence length or shorten the prompts")
    if embedding_rows is not None:
        for row, example in enumerate(examples, start=1):
            past = [t for t in example["input_ids"] if t >= embedding_rows]
            if past:
                token = tokenizer.convert_ids_to_tokens(past[0]) if tokenizer is not None else "?"
                ids = f"the tokenizer has {len(tokenizer)} ids" if tokenizer is not None else "a larger vocabulary"
                errors.append(f"{source}: row {row}: token {token!r} (id {past[0]}) is past the model's embedding "
                              f"({embedding_rows} rows; {ids}); use the tokenizer the model was trained with, or "
                              "resize the embedding (model.resize_token_embeddings) and save the model")
                break
    return errors


# ---------------------------------------------------------------- label masks (the echo's first cause)


def check_label_masks(examples: list[dict], title: str = "label masks") -> Report:
    """Two mask mistakes that teach a model to repeat its prompt.

    Error: labels shifted by one before the model (Hugging Face models shift inside their loss, so the
    model learns to predict each token two steps ahead of where it stands).
    Warning: the prompt is supervised (the first real token is learned in nearly every example), so
    the model learns to write prompts, not answers; mask them with -100 (train_on_inputs false).
    """
    report = Report(title)
    shifted = aligned = prompt_learned = 0
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        for i, label in enumerate(labels):
            if label == IGNORE_INDEX:
                continue
            aligned += label == ids[i]
            shifted += i + 1 < len(ids) and label == ids[i + 1] and label != ids[i]
        if len(labels) > 1 and labels[1] != IGNORE_INDEX:
            prompt_learned += 1
    report.stats = {"supervised tokens equal to their input": aligned, "supervised tokens equal to the next input": shifted,
                    "examples whose prompt is supervised": prompt_learned}
    if shifted > aligned:
        report.add("error", "labels are shifted by one (label[i] == input_ids[i+1]): the model shifts them "
                            "again inside its loss; keep labels aligned with input_ids")
    if examples and prompt_learned >= 0.9 * len(examples):
        report.add("warning", f"{prompt_learned} of {len(examples)} examples supervise their prompt: the model "
                              "learns to reproduce prompts (one cause of 'it only repeats the prompt'); mask "
                              "the prompt with -100 (train_on_inputs: false)")
    return report


# ---------------------------------------------------------------- tokenizers


def _tokenizer_parts(tokenizer) -> dict:
    import json

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    return {
        "vocabulary": model.get("vocab"),
        "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []],
        "added tokens": sorted((t["id"], t["content"], t["special"]) for t in backend.get("added_tokens", [])),
        "normalizer": backend.get("normalizer"),
        "pre-tokenizer": backend.get("pre_tokenizer"),
        "chat template": getattr(tokenizer, "chat_template", None),
        "bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
    }


def _describe_difference(part: str, a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict) and part == "vocabulary":
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        moved = sum(1 for t in set(a) & set(b) if a[t] != b[t])
        return f"vocabulary: {len(only_a)} tokens only in A, {len(only_b)} only in B, {moved} with other ids"
    if isinstance(a, list) and isinstance(b, list):
        return f"{part}: {len(a)} in A, {len(b)} in B, {len(set(map(str, a)) ^ set(map(str, b)))} differ"
    short = lambda value: (repr(value)[:60] + "...") if len(repr(value)) > 60 else repr(value)
    return f"{part}: A {short(a)}, B {short(b)}"


def compare_tokenizers(a, b, title: str = "tokenizers") -> Report:
    """identical / same-vocabulary (same ids for the same text; template or special-token roles differ)
    / different. Base and instruct Llama 3 tokenizers are same-vocabulary: data tokenized with one is
    valid for the other, but only the instruct one has the chat template and the end-of-turn eos."""
    parts_a, parts_b = _tokenizer_parts(a), _tokenizer_parts(b)
    differing = [part for part in parts_a if parts_a[part] != parts_b[part]]
    encoding_parts = {"vocabulary", "merges", "added tokens", "normalizer", "pre-tokenizer"}
    if not differing:
        verdict = "identical"
    elif encoding_parts.isdisjoint(differing):
        verdict = "same-vocabulary"
    else:
        verdict = "different"
    report = Report(title, stats={"verdict": verdict, "vocabulary sizes": (len(a), len(b))})
    for part in differing:
        level = "error" if part in encoding_parts else "info"
        report.add(level, _describe_difference(part, parts_a[part], parts_b[part]))
    if verdict == "different":
        report.add("error", "these tokenizers map text to different ids: data and models made with one are "
                            "not valid for the other")
    return report


# ---------------------------------------------------------------- checkpoints


def check_checkpoint(path) -> Report:
    """Complete or not (.metadata and every shard it names), what it holds (model, optimizer, step),
    and its size against the prediction (4 B/param weights, 8 B/trainable param for AdamW)."""
    from recipes_core.checkpoint import (METADATA, CheckpointError, incomplete_reasons, load_train_params, measured_sizes,
                                         read_metadata, select_checkpoint, size_report)
    from recipes_core.safety import CodeInCheckpointError, UnsafeCheckpointError

    try:
        ckpt_dir, _ = select_checkpoint(path)
    except CheckpointError as err:  # a run folder whose `latest` is damaged: a finding like any other
        report = Report(f"checkpoint {path}")
        report.add("error", str(err))
        return report
    if (ckpt_dir / METADATA).is_file():
        try:
            read_metadata(ckpt_dir)
        except CodeInCheckpointError:
            raise  # a planted payload is refused outright (exit 2), not reported as damage
        except UnsafeCheckpointError:
            pass  # damaged: incomplete_reasons reports it
    report = Report(f"checkpoint {ckpt_dir}")
    for reason in incomplete_reasons(ckpt_dir):
        report.add("error", reason)
    if not report.ok:
        return report
    params = load_train_params(ckpt_dir)
    saved = read_metadata(ckpt_dir).state_dict_metadata
    holds = sorted({key.split(".")[0] for key in saved})
    report.stats = {"holds": ", ".join(holds), "step": params.get("step"),
                    "model tensors": sum(key.startswith("model.") for key in saved),
                    "lora adapter only": bool(params.get("lora")), "world size": params.get("world_size")}
    if params.get("save_optimizer") and not {"optim", "scheduler", "trainer"} <= set(holds):
        report.add("error", "train_params.yaml says save_optimizer but the checkpoint lacks optimizer, "
                            "scheduler or trainer state: it cannot resume exactly")
    if params.get("param_counts"):
        sizes = size_report(ckpt_dir)
        written, predicted = sizes["measured"]["files_on_disk"], sizes["predicted"]["total"]
        report.stats.update({"bytes written": written, "bytes predicted": predicted,
                             "written / predicted": round(sizes["ratio_total"], 4)})
        # Each stored tensor carries a few KiB of serialisation header: noise for real models, not for tiny adapters.
        allowance = 0.1 * predicted + 8192 * len(read_metadata(ckpt_dir).storage_data)
        if abs(written - predicted) > allowance:
            report.add("warning", f"the files are {sizes['ratio_total']:.2f}x the predicted size: something is "
                                  "saved twice, or not saved")
    else:
        report.stats["bytes written"] = measured_sizes(ckpt_dir)["files_on_disk"]
        report.add("info", "no param_counts in train_params.yaml: size not compared with a prediction")
    return report


# ---------------------------------------------------------------- models: template, stop ids, echo


def check_model_setup(tokenizer, generation_config, title: str = "model setup") -> Report:
    """Chat template present, the stop ids include end of turn, pad vs eos, base or instruct."""
    from recipes_core.preprocess import end_of_turn_token

    report = Report(title)
    eos = generation_config.eos_token_id if generation_config is not None else None
    stop_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    end_of_turn = end_of_turn_token(tokenizer)
    report.stats = {"kind": "instruct (chat template)" if end_of_turn else "base (no chat template)",
                    "stop ids": stop_ids, "end of turn": end_of_turn,
                    "eos": tokenizer.eos_token, "pad": tokenizer.pad_token}
    if not getattr(tokenizer, "chat_template", None):
        report.add("warning", "no chat template: this is a base model (or its template was not saved); "
                              "use completion prompts (e.g. Alpaca), and never chat, with it")
    elif end_of_turn is not None:
        end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        if end_id not in stop_ids:
            report.add("error", f"generation_config.eos_token_id {stop_ids} does not include the end-of-turn "
                                f"token {end_of_turn} (id {end_id}): generation runs past the answer into "
                                "new turns; list every end id (recipes_core.tokens.end_token_ids)")
    if tokenizer.pad_token_id is None:
        report.add("info", "no pad token: batched generation and padding collators need one")
    elif tokenizer.pad_token_id == tokenizer.eos_token_id:
        report.add("warning", f"pad equals eos ({tokenizer.eos_token}): a collator that masks pads by id also "
                              "masks every supervised eos, and the model never learns to stop; mask padding "
                              "by position (recipes_core.collate does)")
    return report


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def repeats_prompt(prompt: str, answer: str, min_chars: int = 24) -> bool:
    """The answer copies the prompt: it contains the prompt's first 40 characters (prompts of at least
    min_chars), equals a short prompt, or is a stretch of min_chars or more copied out of the prompt."""
    prompt, answer = _normalise(prompt), _normalise(answer)
    if not prompt or not answer:
        return False
    if len(prompt) < min_chars:
        return answer == prompt
    return prompt[:40] in answer or (len(answer) >= min_chars and answer in prompt)


def check_answers(prompts: list[str], answers: list[str], title: str = "echo test") -> Report:
    """Flag empty answers and answers that repeat their prompt."""
    report = Report(title)
    empty = [i for i, a in enumerate(answers, start=1) if not a.strip()]
    echoed = [i for i, (p, a) in enumerate(zip(prompts, answers), start=1) if a.strip() and repeats_prompt(p, a)]
    report.stats = {"prompts": len(prompts), "empty answers": len(empty), "answers repeating the prompt": len(echoed)}
    for i, answer in enumerate(answers[:3], start=1):
        report.stats[f"answer {i}"] = answer[:60]
    if empty:
        report.add("error", f"empty answers to prompts {_rows(empty)}: the model stops at once (trained with "
                            "the prompt unmasked, or fed a prompt format it never saw)")
    if echoed:
        report.add("error", f"answers repeat their prompt ({_rows(echoed)}): decode only the new tokens "
                            "(output[:, prompt_length:]), mask prompt labels with -100, use the chat template")
    return report


ECHO_PROMPTS = ["Give the first item of the list.\nmango, bridge, wolf", "Is this review positive or negative?\n"
                "the soup was wonderful and the staff was friendly", "How many items does this list contain?\n"
                "apple, horse, taxi"]


def echo_test(model, tokenizer, prompts: list[str] | None = None, mode: str | None = None,
              max_new_tokens: int = 24) -> Report:
    """Generate (greedy, chat mode when there is a chat template) and check the answers."""
    from recipes_core.infer import generate

    prompts = prompts or ECHO_PROMPTS
    mode = mode or ("chat" if getattr(tokenizer, "chat_template", None) else "completion")
    answers = generate(model, tokenizer, prompts, mode=mode, max_new_tokens=max_new_tokens)
    return check_answers(prompts, answers, title=f"echo test ({mode})")


def check_model(model, tokenizer, echo_prompts: list[str] | None = None, title: str = "model") -> Report:
    """check_model_setup and echo_test in one report."""
    report = Report(title)
    for part in (check_model_setup(tokenizer, model.generation_config), echo_test(model, tokenizer, echo_prompts)):
        report.stats.update(part.stats)
        report.findings += part.findings
    return report
