"""Type aliases the library's modules share."""

from typing import Any

# A nested structure (dicts, lists, tuples, NamedTuples) of arrays:
# parameters, optimizer states, train states, batches.
PyTree = Any
