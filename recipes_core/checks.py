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
