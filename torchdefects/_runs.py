"""Horizontal runs of foreground pixels: the unit of work of labeling and statistics.

A run is a maximal horizontal segment of foreground pixels in one row. Working on
runs instead of pixels makes the cost grow with the amount of foreground structure
(what sparse defect masks have little of), and runs found in raster order already
carry the order SciPy numbers components in.
"""

from typing import List, Tuple

import torch
from torch import Tensor

__all__: List[str] = []


def _row_runs(fg: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Runs of ``True`` in each row of ``fg``, in raster order.

    Args:
        fg: :math:`(N, W)` bool, rows of all images stacked.

    Returns:
        ``(row, start, end)``: int64 :math:`(R,)` each; run ``i`` covers columns
        ``start[i] .. end[i] - 1`` of row ``row[i]`` (``end`` is exclusive).
    """
    n, w = fg.shape[0], fg.shape[1]
    # A zero column on each side makes every run start and end inside its row, so the
    # flat positions of the changes alternate start, end, start, end, ...
    edge = torch.zeros((n, 1), dtype=torch.bool, device=fg.device)
    padded = torch.cat([edge, fg, edge], dim=1)
    change = padded[:, 1:] != padded[:, :-1]
    flat = torch.nonzero(change.view(-1)).view(-1, 2)
    row = torch.div(flat[:, 0], w + 1, rounding_mode="floor")
    start = flat[:, 0] - row * (w + 1)
    end = flat[:, 1] - row * (w + 1)
    if n == 0:
        row = row.view(0)
    return row, start, end


def _fill_runs(values: Tensor, row: Tensor, start: Tensor, end: Tensor, n: int, w: int) -> Tensor:
    """Paint ``values[i]`` (int32) over run ``i`` of an :math:`(N, W)` zero canvas."""
    numel = n * w
    # Add +v at each run's first pixel and -v just past its last, then a prefix sum.
    # Integer adds commute exactly, so the result is deterministic on every device.
    delta = torch.zeros(numel + 1, dtype=torch.int32, device=values.device)
    delta.index_add_(0, row * w + start, values)
    delta.index_add_(0, row * w + end, -values)
    return torch.cumsum(delta[:numel], 0, dtype=torch.int32).view(n, w)
