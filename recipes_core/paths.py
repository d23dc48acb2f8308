"""No command deletes or replaces its own input.

A command that writes a folder it may first remove (convert --overwrite, the quickstart's checkpoints
folder, a rebuilt model cache) asks `refuse_overlap` first: the folder it would remove must not be, hold,
or lie inside anything it reads. Paths are compared resolved (symlinks and `..` followed), so
`runs/x/step_4/../step_4` is caught as well as `runs/x/step_4`.
"""

from __future__ import annotations

from pathlib import Path

from recipes_core.errors import UserError


class UnsafeOutputError(UserError, ValueError):
    """The output would replace, or be written into, one of the command's own inputs."""


def overlap(target: str | Path, source: str | Path) -> str | None:
    """How `target` overlaps `source`: "is", "lies inside", "contains", or None when they are apart."""
    target, source = Path(target).resolve(), Path(source).resolve()
    if target == source:
        return "is"
    if source in target.parents:
        return "lies inside"
    if target in source.parents:
        return "contains"
    return None


def refuse_overlap(target: str | Path, sources: dict[str, str | Path], option: str = "the output") -> None:
    """UnsafeOutputError when `target` is, lies inside, or contains one of `sources` ({what: path})."""
    for what, source in sources.items():
        how = overlap(target, source)
        if how:
            raise UnsafeOutputError(f"{option} {target} {how} {what} {source}; writing it would replace or "
                                    "damage that input: choose a folder outside it")
