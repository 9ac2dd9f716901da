"""Exact connected-component labeling of batches of binary masks, on their device.

Numbering equals ``scipy.ndimage.label``: in each image, components are numbered
``1..n`` in raster order of their first pixel, whatever the batch position or device.

How: every horizontal run of foreground pixels is a node (``_runs.py``); runs that
touch between consecutive rows of the same image are joined by edges; a
union-find by *hook and compress* merges them: each edge hooks the larger of its
two roots onto the smaller (``scatter_reduce(amin)``), pointer jumping flattens
the trees, and the two repeat until no edge joins two roots. Minimum hooking
leaves each component rooted at its first run in raster order, so a cumulative
count of roots numbers components as SciPy does. The work grows with the number of
runs, not of pixels, apart from a few flat passes over the mask.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from torchdefects._check import _as_bhw
from torchdefects._runs import (
    _flat_nonzero,
    _paint_runs,
    _row_runs,
    _run_pixels,
    _RunPixels,
    _runs_at,
)

__all__ = ["connected_components"]


def _run_edges(
    run_id: Optional[Tensor],
    px: _RunPixels,
    row: Tensor,
    y: Tensor,
    start: Tensor,
    num_rows: int,
    height: int,
    width: int,
    connectivity: int,
) -> Tuple[Tensor, Tensor]:
    """Pairs ``(u, v)`` of runs of consecutive rows of one image that touch, each once.

    Two touching runs overlap (for 8-connectivity: with one column of slack) on an
    interval that begins at the start of one of them, so it is enough to look, from
    each run's start, at the pixel above and below it (and, for 8-connectivity, at
    the one before each of those). A pair is kept from the side of the run that
    starts later (from below on a tie), so each appears once. ``run_id``, the flat
    map of 1-based run ids, answers each look in O(1); without it, a binary search.
    """
    looks: List[Tensor] = []
    keeps: List[Tensor] = []
    for dy in [-1, 1]:
        inside = (y != 0) if dy == -1 else (y != height - 1)
        base = (row + dy).clamp(0, num_rows - 1) * width + start
        here = _runs_at(base, run_id, px.first, px.stop)  # int32, -1 for background
        candidates = [here]
        if connectivity == 8:
            before = _runs_at((base - 1).clamp(min=0), run_id, px.first, px.stop)
            candidates.append(before.masked_fill((start == 0) | (before == here), -1))
        for other in candidates:
            other_start = start.index_select(0, other.clamp(min=0))
            later = (other_start <= start) if dy == -1 else (other_start < start)
            looks.append(other)
            keeps.append(inside & (other >= 0) & later)
    # Looks side by side, one row per run: one nonzero (one host sync) finds every hit,
    # and the run that looked is the hit's row, a shift away (2 or 4 looks per run).
    hit = _flat_nonzero(torch.stack(keeps, 1).view(-1))
    shift = 1 if len(looks) == 2 else 2
    u = torch.bitwise_right_shift(hit, shift)
    v = torch.stack(looks, 1).view(-1).index_select(0, hit)
    return u, v


def _union_find(num_nodes: int, u: Tensor, v: Tensor) -> Tensor:
    """Root of every node; each root is the smallest node of its component."""
    parent = torch.arange(num_nodes, device=u.device)
    while u.numel() > 0:
        pu = parent.index_select(0, u)
        pv = parent.index_select(0, v)
        live = _flat_nonzero(pu != pv)
        if live.numel() == 0:
            break
        u, v = u.index_select(0, live), v.index_select(0, live)
        pu, pv = pu.index_select(0, live), pv.index_select(0, live)
        parent.scatter_reduce_(0, torch.maximum(pu, pv), torch.minimum(pu, pv), reduce="amin")
        # Two jumps per check: when the second changes nothing, every node points to a
        # root. Half the host syncs of checking after each jump.
        while True:
            parent = parent.index_select(0, parent)
            grand = parent.index_select(0, parent)
            if bool(torch.equal(grand, parent)):
                break
            parent = grand
    return parent


class _ConnectedRuns(NamedTuple):
    """The runs of a batch of masks, joined into components (see the module docstring)."""

    row: Tensor  # int64 (R,), row over the whole batch
    image: Tensor  # int64 (R,)
    y: Tensor  # int64 (R,), row within the image
    start: Tensor  # int64 (R,), first column
    end: Tensor  # int64 (R,), one past the last column
    root: Tensor  # int64 (R,), the component's first run
    pixels: _RunPixels
    canvas: Optional[Tensor]  # int32 flat map of 1-based run ids (if made), free for reuse


def _connect_runs(fg: Tensor, connectivity: int, with_canvas: bool = False) -> _ConnectedRuns:
    """Runs of ``fg`` (bool :math:`(B, H, W)`, at least one pixel) and their components.

    ``with_canvas`` asks for the map of run ids even where a search would be cheaper.
    """
    b, h, w = fg.shape[0], fg.shape[1], fg.shape[2]
    numel = b * h * w
    row, start, end = _row_runs(fg.reshape(b * h, w))
    num_runs = row.shape[0]
    px = _run_pixels(row, start, end, w, numel)
    canvas: Optional[Tensor] = None
    # A map of run ids answers each look with a gather; few long runs (a mostly-empty
    # background) are cheaper to search than to paint over every pixel.
    if with_canvas or px.sparse or 64 * num_runs > numel:
        ids = torch.arange(1, num_runs + 1, dtype=torch.int32, device=fg.device)
        canvas = _paint_runs(ids, px, numel)
    image = torch.div(row, h, rounding_mode="floor")
    y = row - image * h
    u, v = _run_edges(canvas, px, row, y, start, b * h, h, w, connectivity)
    root = _union_find(num_runs, u, v)
    return _ConnectedRuns(row, image, y, start, end, root, px, canvas)


def connected_components(mask: Tensor, connectivity: int = 8) -> Tuple[Tensor, Tensor]:
    r"""Label the connected components of every mask of a batch, exactly.

    Args:
        mask: :math:`(B, H, W)` or :math:`(B, 1, H, W)`; bool, or any dtype where
            nonzero is foreground.
        connectivity: 4 (edge neighbours, SciPy's default) or 8 (edges and corners).

    Returns:
        ``(labels, counts)``: ``labels`` int32 with the shape of ``mask``, 0 for
        background and ``1..counts[b]`` for the components of image ``b`` in raster
        order of their first pixel (``scipy.ndimage.label``'s numbering); ``counts``
        int64 :math:`(B,)`.

    Raises:
        ValueError: ``mask`` is not 3-D or 4-D with one channel, or ``connectivity``
            is not 4 or 8.

    Note:
        Labels are int32, which holds the components of any image below
        :math:`2^{31}` pixels; flat indices over the batch are int64.

    Example:
        >>> mask = torch.tensor([[[1, 0, 1], [1, 0, 0], [0, 0, 1]]], dtype=torch.bool)
        >>> labels, counts = connected_components(mask, connectivity=4)
        >>> labels
        tensor([[[1, 0, 2],
                 [1, 0, 0],
                 [0, 0, 3]]], dtype=torch.int32)
        >>> counts
        tensor([3])
    """
    if connectivity != 4 and connectivity != 8:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    x = _as_bhw(mask, "mask")
    b, h, w = x.shape[0], x.shape[1], x.shape[2]
    fg = x if x.dtype == torch.bool else x != 0
    counts = torch.zeros(b, dtype=torch.int64, device=mask.device)
    if fg.numel() == 0:
        return torch.zeros(mask.shape, dtype=torch.int32, device=mask.device), counts
    runs = _connect_runs(fg, connectivity)
    num_runs = runs.row.shape[0]
    if num_runs == 0:
        return torch.zeros(mask.shape, dtype=torch.int32, device=mask.device), counts

    is_root = (runs.root == torch.arange(num_runs, device=mask.device)).to(torch.int64)
    counts.index_add_(0, runs.image, is_root)
    first_of_image = torch.cumsum(counts, 0) - counts
    rank = torch.cumsum(is_root, 0)
    run_label = rank.index_select(0, runs.root) - first_of_image.index_select(0, runs.image)
    labels = _paint_runs(run_label.to(torch.int32), runs.pixels, b * h * w, out=runs.canvas)
    return labels.view(mask.shape), counts
