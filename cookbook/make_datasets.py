"""Write the cookbook's datasets into cookbook/data (or --out DIR): `make data`.

    python cookbook/make_datasets.py [--out cookbook/data] [--seed 0]

The generator lives in the library (recipes_core.synthetic_data), so an installed recipes_core makes the
same files without this checkout; this script only picks the cookbook's folder as the default.
"""

from pathlib import Path

from recipes_core.synthetic_data import main

if __name__ == "__main__":
    main(default_out=str(Path(__file__).parent / "data"))
