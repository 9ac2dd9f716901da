"""Horizontal runs of foreground pixels: the unit of work of labeling and statistics.

A run is a maximal horizontal segment of foreground pixels in one row. Working on
runs instead of pixels makes the cost grow with the amount of foreground structure
(what sparse defect masks have little of), and runs found in raster order already
carry the order SciPy numbers components in.

Everything here has fixed-size outputs once the runs are listed (one ``nonzero``),
so it needs no host synchronization of its own, and exports with ``torch.export``.
"""

from typing import List, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__: List[str] = []


def _exporting() -> bool:
    """True while ``torch.export`` / ``torch.compile`` traces (never in TorchScript)."""
    # Nested on purpose: TorchScript drops a branch only when its whole condition is
    # ``not torch.jit.is_scripting()``.
    if not torch.jit.is_scripting():  # noqa: SIM102
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return True
    return False


def _eager_cpu(x: Tensor) -> bool:
    """True for a plain CPU tensor outside TorchScript and export (NumPy may read it)."""
    if not torch.jit.is_scripting():  # noqa: SIM102
        # Plain tensors only: the fake tensors of torch.export / torch.compile have no data.
        if x.device.type == "cpu" and type(x) is torch.Tensor and not _exporting():
            return True
    return False


def _flat_nonzero(x: Tensor, columns: int = 1) -> Tensor:
    """Indices of the nonzero elements of a 1-D tensor, ascending, int64.

    ``columns > 1`` returns them in rows of that many, :math:`(N / columns, columns)`
    (one view instead of two).

    Eager CPU tensors go through NumPy's ``flatnonzero``, 3x to 9x faster than
    ``torch.nonzero`` on CPU (measured in docs/benchmarks.md); the result is the same.
    """
    if not torch.jit.is_scripting():  # noqa: SIM102
        if _eager_cpu(x):
            idx = torch.from_numpy(np.flatnonzero(x.numpy()))
            return idx if columns == 1 else idx.view(-1, columns)
    if columns == 1:
        return torch.nonzero(x).view(-1)
    return torch.nonzero(x).view(-1, columns)


class _Runs(NamedTuple):
    """The runs of a stack of rows, in raster order.

    Run ``i`` covers columns ``start[i] .. end[i] - 1`` of row ``row[i]``. ``count`` is
    the flat prefix count of the value changes over the rows padded with one column
    (:math:`N (W + 1)` int32): ``2 i + 1`` on the pixels of run ``i``, ``2 i`` on the
    background before it. It answers "which run is here, or next" with one gather.
    """

    row: Tensor  # int64 (R,)
    start: Tensor  # int64 (R,)
    end: Tensor  # int64 (R,), exclusive
    count: Tensor  # int32 (int64 from 2**31 pixels) (N * (W + 1),)


def _row_runs(fg: Tensor, with_count: bool = True) -> _Runs:
    """Runs of ``True`` in each row of ``fg`` (bool :math:`(N, W)`, rows stacked).

    ``with_count=False`` leaves ``count`` empty (it costs a pass over the pixels).
    """
    w = fg.shape[1]
    # A background column on each side makes every run start and end inside its row, so
    # the flat positions of the changes alternate start, end, start, end, ...
    padded = torch.nn.functional.pad(fg, [1, 1])
    change = (padded.narrow(1, 1, w + 1) != padded.narrow(1, 0, w + 1)).view(-1)
    pair = _flat_nonzero(change, 2)
    # Start and end of a run lie in the same row of w + 1 changes.
    row = torch.div(pair.select(1, 0), w + 1, rounding_mode="floor")
    if _exporting():
        # ONNX has no remainder by a symbolic scalar: subtract the row's offset instead.
        start, end = (pair - (row * (w + 1)).unsqueeze(1)).unbind(1)
    else:
        start, end = torch.remainder(pair, w + 1).unbind(1)
    count = torch.empty(0, dtype=torch.int32, device=fg.device)
    if with_count:
        # int32 halves the traffic; a batch of 2**31 pixels or more needs int64.
        wide = change.shape[0] >= 2**31
        count = torch.cumsum(change, 0, dtype=torch.int64 if wide else torch.int32)
    return _Runs(row, start, end, count)


def _paint(runs: _Runs, values: Tensor, width: int) -> Tensor:
    """:math:`(N, W)` map holding ``values[i]`` on the pixels of run ``i``, 0 elsewhere.

    One gather from ``[0, v0, 0, v1, 0, ...]`` by the change count (odd on run ``i``'s
    pixels, even off the runs). Integer counts are exact: the same map on every device,
    no host synchronization. The result is a view (rows of ``W + 1``, the last column
    dropped): ``.view`` splits its rows, ``.reshape`` makes it contiguous.
    """
    table = values.new_zeros(2 * values.shape[0] + 1)
    table[1::2] = values
    return table.index_select(0, runs.count).view(-1, width + 1).narrow(1, 0, width)


def _owner(ends: Tensor, total: int) -> Tensor:
    """For each of ``total`` items, the segment it falls in: segment ``i`` covers items
    ``ends[i - 1] .. ends[i] - 1`` (``ends`` ascending, the last equal to ``total``).

    ``repeat_interleave(arange(len(ends)), lengths, output_size=total)`` without
    ``repeat_interleave`` (ONNX has none): a mark at each segment end, then a prefix count.
    """
    marks = torch.zeros(total + 1, dtype=torch.int64, device=ends.device)
    marks = marks.scatter_add(0, ends, torch.ones_like(ends))
    return torch.cumsum(marks, 0).narrow(0, 0, total)
