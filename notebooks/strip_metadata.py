"""Remove run-specific noise from executed notebooks so diffs show only real changes.

    python notebooks/strip_metadata.py notebooks/*.ipynb

Keeps outputs; drops cell execution timestamps and widget state, and pins the kernelspec to `python3`.
"""

import sys

import nbformat

for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    nb.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
    nbformat.write(nb, path)
