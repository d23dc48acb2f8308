"""One error story for bad input: every mistake a user can fix (a data row, a config key, a damaged
checkpoint, a missing tokenizer file) is a UserError whose message names the file (row, field or line
where there is one) and what to do. The commands print it as one line, `error: <message>`, on stderr
(rank 0 only under torchrun) and exit with status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the message names where and what to do."""
