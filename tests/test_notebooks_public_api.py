"""Notebooks teach the public API: what a learner copies from a cell must work in their own code.

Every code cell of notebooks/*.ipynb is parsed (ast, no execution) and checked for:
  * a `_private` name imported from recipes_core, or a private module (`recipes_core._x`);
  * `recipes_core.X._y` attribute access (the same thing without an import);
  * an import from `recipes_core.finetune`: the trainer is a program, run with recipes_core.launch.run_recipe,
    its helpers are not an API;
  * an import of a name recipes_core does not have (a stale or misspelt name);
  * `sys.path` edits (importing cookbook code by path instead of running it, or using the package).
"""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PROGRAM_MODULES = {"recipes_core.finetune"}  # run them, don't import from them


def code_cells(path: Path):
    for index, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            # IPython magics and shell escapes are not Python
            lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
            yield index, ast.parse("\n".join(lines))


def private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def offences(path: Path) -> list[str]:
    found = []
    for index, tree in code_cells(path):
        where = f"{path.name} cell {index}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "recipes_core":
                if private(node.module) or node.module in PROGRAM_MODULES:
                    found.append(f"{where}: from {node.module} import ... (not public API)")
                    continue
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if private(alias.name):
                        found.append(f"{where}: imports the private name {node.module}.{alias.name}")
                    elif not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            found.append(f"{where}: {node.module} has no {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "recipes_core" and (private(alias.name)
                                                                       or alias.name in PROGRAM_MODULES):
                        found.append(f"{where}: import {alias.name} (not public API)")
            elif isinstance(node, ast.Attribute) and private(node.attr):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id == "recipes_core":
                    found.append(f"{where}: uses the private attribute {node.attr}")
            elif (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                  and node.value.id == "sys"):
                found.append(f"{where}: touches sys.path (run cookbook scripts, import only the installed package)")
    return found


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 10


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_public_api_only(path):
    assert offences(path) == []


def test_the_checker_catches_private_imports(tmp_path):
    cells = ["from recipes_core.checkpoint import _read_metadata, find_latest",
             "import sys\nsys.path.insert(0, 'cookbook')",
             "from recipes_core.finetune import token_loss_sum",
             "import recipes_core.checkpoint\nrecipes_core.checkpoint._private_helper()",
             "from recipes_core.checkpoint import no_such_name",
             "%matplotlib inline\nfrom recipes_core.checkpoint import read_metadata"]
    nb = {"cells": [{"cell_type": "code", "source": c, "metadata": {}, "outputs": []} for c in cells],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "bad.ipynb"
    path.write_text(json.dumps(nb))
    found = offences(path)
    assert [f.split(":")[0] for f in found] == [f"bad.ipynb cell {i}" for i in range(5)], found
