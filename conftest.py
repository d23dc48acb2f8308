"""Test-suite budget: after the run, the wall time of every test file and notebook (setup + call + teardown
of its items), largest first. The test command must stay within 25 minutes, install included; this is where
to look when it does not. Here at the root so that it sees the notebooks (nbval items) as well as tests/."""

from __future__ import annotations

from collections import defaultdict

_seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report) -> None:
    _seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    if not _seconds:
        return
    terminalreporter.section("wall time per file (setup + call + teardown)")
    for path, seconds in sorted(_seconds.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f}s  {path}")
    terminalreporter.write_line(f"{sum(_seconds.values()):8.1f}s  total")
