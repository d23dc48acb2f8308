"""One error story for bad input: every mistake a user can fix (a data row, a config key, a damaged
checkpoint, a missing tokenizer file) is a UserError whose message names the file (row, field or line
where there is one) and what to do. Every command's main is wrapped in `command`, which prints it as one
line, `error: <message>`, on stderr (rank 0 only under torchrun) and exits with status 2; anything else
is a bug and keeps its traceback.

    @command
    def main(argv=None) -> int: ...

    if __name__ == "__main__":
        sys.exit(main())

The error is found where the input is read (the file, row and field are known there), never by catching
broad exceptions at the top: a KeyError from a bug must not be reported as the user's mistake.
"""

from __future__ import annotations

import functools
import os
import sys

USER_ERROR_EXIT = 2  # the status of every command on bad input (argparse uses 2 for a bad option too)


class UserError(Exception):
    """Bad input the user can fix; the message names where and what to do."""


class UsageError(UserError, ValueError):
    """A command-line value no run can use (e.g. --batch-size 0)."""


def one_line(text) -> str:
    """The message on one line (a YAML parser's or a list of reasons' newlines folded)."""
    return " ".join(str(text).split())


def is_rank0() -> bool:
    """True outside torchrun and on global rank 0 under it: the rank that reports, once."""
    return os.environ.get("RANK", "0") == "0"


def _launcher_store():
    """The key-value store of the torchrun agent that started this process (None outside torchrun)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=60))


def _report_key() -> str:
    return f"recipes_core/error_reported/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def report(err: BaseException) -> None:
    """Rank 0 prints the line; under torchrun the other ranks wait (up to a minute) until it has, because
    torchrun stops every rank as soon as one exits with an error, and rank 0 may still be importing."""
    if is_rank0():
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    try:
        store = _launcher_store()
        if store is None:
            return
        if is_rank0():
            store.set(_report_key(), "1")
        else:
            store.wait([_report_key()])
    except Exception:  # no store, or rank 0 never reported (its own error differs): exit anyway
        pass


def command(main):
    """Wrap a command's main(argv): a UserError becomes one `error:` line (rank 0) and SystemExit(2)."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None):
        try:
            return main(argv)
        except UserError as err:
            report(err)
            raise SystemExit(USER_ERROR_EXIT) from None
    return run
