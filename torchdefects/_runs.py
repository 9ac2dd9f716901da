"""Horizontal runs of foreground pixels: the unit of work of labeling and statistics.

A run is a maximal horizontal segment of foreground pixels in one row. Working on
runs instead of pixels makes the cost grow with the amount of foreground structure
(what sparse defect masks have little of), and runs found in raster order already
carry the order SciPy numbers components in.
"""

from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__: List[str] = []


def _flat_nonzero(x: Tensor) -> Tensor:
    """Indices of the nonzero elements of a 1-D tensor, ascending, int64.

    Eager CPU tensors go through NumPy's ``flatnonzero``, 3x to 9x faster than
    ``torch.nonzero`` on CPU (measured in docs/benchmarks.md); the result is the same.
    """
    # Nested on purpose: TorchScript drops a branch only when its whole condition is
    # ``not torch.jit.is_scripting()``.
    if not torch.jit.is_scripting():  # noqa: SIM102
        # Plain tensors only: the fake tensors of torch.export / torch.compile have no data.
        if x.device.type == "cpu" and type(x) is torch.Tensor:
            return torch.from_numpy(np.flatnonzero(x.numpy()))
    return torch.nonzero(x).view(-1)


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
    flat = _flat_nonzero(change.reshape(-1)).view(-1, 2)
    first, stop = flat[:, 0].contiguous(), flat[:, 1].contiguous()
    row = torch.div(first, w + 1, rounding_mode="floor")
    row_start = row * (w + 1)
    return row, first - row_start, stop - row_start


class _RunPixels(NamedTuple):
    """Where the pixels of the runs are: all of them, or (for dense masks) only bounds."""

    sparse: bool
    pos: Tensor  # flat index of every run pixel, raster order (sparse only)
    run: Tensor  # run of every run pixel (sparse only)
    first: Tensor  # flat index of each run's first pixel
    stop: Tensor  # flat index just past each run's last pixel


def _run_pixels(row: Tensor, start: Tensor, end: Tensor, width: int, numel: int) -> _RunPixels:
    """Locate the pixels of the runs once, to paint per-run values over them.

    A mask with little foreground lists its run pixels (work grows with them); a
    dense one keeps only run bounds and paints with one prefix sum over the canvas,
    which is then cheaper than listing half the pixels.
    """
    length = end - start
    first = row * width + start
    stop = first + length
    total = int(length.sum())
    if 4 * total > numel:
        empty = torch.empty(0, dtype=torch.int64, device=row.device)
        return _RunPixels(False, empty, empty, first, stop)
    run = torch.repeat_interleave(
        torch.arange(row.shape[0], device=row.device), length, output_size=total
    )
    begin = torch.cumsum(length, 0) - length
    step = torch.arange(total, device=row.device) - begin.index_select(0, run)
    pos = first.index_select(0, run) + step
    return _RunPixels(True, pos, run, first, stop)


def _paint_runs(values: Tensor, px: _RunPixels, numel: int, out: Optional[Tensor] = None) -> Tensor:
    """Flat int32 canvas of ``numel`` pixels holding ``values[i]`` on run ``i``, else 0.

    ``out``, when given, must already be 0 off the runs; it is painted in place.
    """
    if px.sparse:
        canvas = torch.zeros(numel, dtype=torch.int32, device=values.device) if out is None else out
        canvas.index_copy_(0, px.pos, values.index_select(0, px.run))
        return canvas
    # +v at each run's first pixel, -v just past its last, then a prefix sum. Integer
    # adds commute exactly, so the result is the same on every device.
    delta = torch.zeros(numel + 1, dtype=torch.int32, device=values.device)
    delta.index_add_(0, px.first, values)
    delta.index_add_(0, px.stop, -values)
    canvas = torch.cumsum(delta[:numel], 0, dtype=torch.int32)
    if out is not None:
        out.copy_(canvas)
        return out
    return canvas


def _runs_at(pos: Tensor, canvas: Optional[Tensor], first: Tensor, stop: Tensor) -> Tensor:
    """The run covering each flat pixel position (int32, -1 for none).

    With a canvas of 1-based run ids it is one gather; without one, a binary search over
    the runs' first pixels (ascending in raster order), cheaper when runs are few but
    long (the background of a defect mask).
    """
    if canvas is not None:
        return canvas.index_select(0, pos) - 1
    j = torch.searchsorted(first, pos, right=True) - 1
    covered = (j >= 0) & (stop.index_select(0, j.clamp(min=0)) > pos)
    return torch.where(covered, j, -1).to(torch.int32)


def _set_runs(mask: Tensor, row: Tensor, start: Tensor, end: Tensor, width: int) -> Tensor:
    """A copy of the flat bool ``mask`` with the pixels of the given runs set."""
    numel = mask.shape[0]
    px = _run_pixels(row, start, end, width, numel)
    if px.sparse:
        return mask.clone().index_fill_(0, px.pos, True)
    ones = torch.ones(row.shape[0], dtype=torch.int32, device=mask.device)
    return mask | (_paint_runs(ones, px, numel) != 0)
