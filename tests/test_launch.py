"""The launcher's allocator (recipes_core.launch.allocator_env): mimalloc preloaded into the ranks unless
the user chose otherwise, and a bad choice is one error line through the command users run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes_core.errors import UserError
from recipes_core.launch import allocator_env, mimalloc_library

REPO = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cmeel-mimalloc is a Linux dependency")


@linux_only
def test_mimalloc_is_installed_and_preloaded_by_default():
    library = mimalloc_library()
    assert library is not None and Path(library).is_file(), "pip install cmeel-mimalloc (a recipes-core dependency)"
    assert allocator_env({}) == {"LD_PRELOAD": library, "MIMALLOC_PURGE_DELAY": "0"}
    assert allocator_env({"MIMALLOC_PURGE_DELAY": "10"})["MIMALLOC_PURGE_DELAY"] == "10"  # the user's value wins


def test_glibc_choice_and_an_existing_preload_are_left_alone():
    assert allocator_env({"RECIPES_ALLOCATOR": "glibc"}) == {}
    assert allocator_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == {}


def test_unknown_allocator_names_the_variable():
    with pytest.raises(UserError, match="RECIPES_ALLOCATOR='tcmalloc'.*mimalloc, glibc"):
        allocator_env({"RECIPES_ALLOCATOR": "tcmalloc"})


def test_unknown_allocator_through_the_launcher_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "RECIPES_ALLOCATOR": "tcmalloc"}
    proc = subprocess.run([sys.executable, "-m", "recipes_core.launch", "--nproc_per_node", "2", "-m",
                           "recipes_core.finetune", "--config", "cookbook/tiny_full.yaml",
                           f"checkpoint.output_dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: environment variable RECIPES_ALLOCATOR='tcmalloc': set it to one of mimalloc, glibc, or unset it"]
    assert not (tmp_path / "run").exists()
