"""Write the cookbook's datasets into cookbook/data (or --out DIR): `make data`.

    python cookbook/make_datasets.py [--out cookbook/data] [--seed 0]

The generator lives in the library (recipes_core.synthetic_data), so an installed recipes_core makes the
same files without this checkout; this script only picks the cookbook's folder as the default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recipes_core.synthetic_data import write_all


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_all(args.out, args.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
