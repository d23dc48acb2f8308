"""Smoke test of benchmarks/: every script starts and writes a row on its tiniest setting (--smoke).

The benchmarks themselves are not part of `make test` (they take minutes and want a quiet machine);
this only checks that each one still runs against the current recipes_core. In-process, one import of
torch for all of them; results go to benchmarks/results/smoke/, never into RESULTS.md.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# (script, extra arguments, the result it writes): every script run_all.py runs, on its tiniest setting.
# train_compare's --profile mode (two more torchrun launches, ~30 s) is left out: the script itself is covered.
SCRIPTS = [("convert_memory", [], "convert"), ("train_compare", [], "train_compare_tiny"),
           ("packing", [], "packing"), ("mfu", [], "mfu"), ("inference", [], "inference"),
           ("memory_scaling", [], "memory_scaling"), ("load_memory", [], "load_memory"),
           ("cuda_train_compare", [], "cuda_train_compare"), ("chunked_loss", ["--ranks", "2"], "chunked_loss")]


@pytest.fixture(scope="module", autouse=True)
def on_path():
    sys.path.insert(0, str(REPO))
    yield
    sys.path.remove(str(REPO))


@pytest.mark.parametrize("script,extra,name", SCRIPTS, ids=[s[2] for s in SCRIPTS])
def test_benchmark_smoke(script, extra, name, monkeypatch):
    monkeypatch.chdir(REPO)  # the scripts use repo-relative recipe and data paths
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    module = importlib.import_module(f"benchmarks.{script}")
    try:
        result = module.main([*extra, "--smoke"])
    finally:
        torch.set_num_threads(threads)
    assert result["smoke"] and result["rows"], f"{name}: no rows"
    written = json.loads((REPO / "benchmarks" / "results" / "smoke" / f"{name}.json").read_text())
    assert written["rows"] == json.loads(json.dumps(result["rows"], default=str))
    if result.get("plot"):
        assert (REPO / "benchmarks" / "results" / "smoke" / result["plot"]).exists()


def test_results_markdown_renders(tmp_path, monkeypatch):
    """RESULTS.md is rebuilt from results/*.json; check the renderer on a made-up result."""
    from benchmarks import common as C

    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(C, "BENCH", tmp_path)
    C.save_result("packing", "2. Packing", "cmd", {"a": 1}, [{"x": 1.5}], [C.ratio("r", 1.7, ">= 1.5x", True)], ["n"],
                  smoke=False)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| r | 1.70x | >= 1.5x | yes |" in text and "Versions:" in text
