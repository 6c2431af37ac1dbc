"""Token rows padded into one tensor: the padding of the stages' collators and of dyprag's batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # a label that carries no loss (torch cross-entropy's default ignore_index)


def pad_rows(rows: Sequence[Sequence[int]], value: int, *, left: bool = False, multiple_of: int = 1) -> torch.Tensor:
    """Token rows filled up with `value` into one [len(rows), width] long tensor: on the right, or on the left
    (`left`: generation continues right after each row), `width` the longest row rounded up to `multiple_of`."""
    import torch

    width = -(-max(len(row) for row in rows) // multiple_of) * multiple_of
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if left else slice(0, len(row))
        out[i, columns] = torch.as_tensor(row, dtype=torch.long)
    return out
