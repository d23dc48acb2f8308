"""recipes_core: a thin, readable library behind the Llama fine-tuning cookbook.

Each module has one job; see README.md for the map. The constant below is the one label value that
PyTorch's cross-entropy ignores by default: every token that must not be learned carries it.
"""

IGNORE_INDEX = -100

__version__ = "0.1.0"
