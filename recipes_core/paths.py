"""Writing outputs safely: no command deletes or replaces its own input, and no reader sees half a file.

A command that writes a folder it may first remove (convert --overwrite, the quickstart's checkpoints
folder, a rebuilt model cache) asks `refuse_overlap` first: the folder it would remove must not be, hold,
or lie inside anything it reads. Paths are compared resolved (symlinks and `..` followed), so
`runs/x/step_4/../step_4` is caught as well as `runs/x/step_4`.

Every folder or pointer file that other processes read is written under a temporary name and renamed
when complete (`written_atomically` for a folder one process writes, `publish_folder` for one many ranks
wrote, `write_text_atomically` for a small file): a reader sees the old one or the new one, never half.
Used by the tiny model cache, gguf_to_hf, convert and the checkpoint save.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def publish_folder(tmp: str | Path, final: str | Path) -> None:
    """Rename the finished folder `tmp` to `final`. An existing `final` is moved aside first and removed
    after, so at every moment `final` is absent, the old folder, or the new one."""
    tmp, final = Path(tmp), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def written_atomically(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final` to write into; publish it as `final` when the block
    ends, remove it when the block raises (a failed write leaves `final` as it was)."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write a small text file (a pointer such as a run's `latest`) through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new content, never half
