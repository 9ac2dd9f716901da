"""Hole filling, labeling and region statistics in one pass over the segments of a mask.

:class:`~torchdefects.DefectHead` with ``fill_holes`` would otherwise list runs, build
edges and run union-find twice: once over the background (:func:`~torchdefects.fill_holes`)
and once over the filled foreground (:func:`~torchdefects.connected_components`). Here both
come from one listing:

- The mask is padded with one background pixel on every side of every image, and the padded
  batch is read as one flat sequence. A *segment* is a maximal run of equal pixels in that
  sequence; segments alternate background, foreground, background, ..., so segment ``k`` is
  foreground exactly when ``k`` is odd, and the running count of value changes is the segment
  of every pixel. A foreground segment is a run of one row; a background segment either lies
  inside one row or holds the pad at a row end (it then continues in the next row).
- Union-find joins foreground segments at ``connectivity`` and background segments at
  4-connectivity, each segment looking up the first segment of its class it touches in the
  rows above and below (the staircase of ``components._run_edges``). Every segment that holds
  a pad pixel is pinned to segment 0 (the top pad row) from the start: the outside.
- A background segment whose root is not 0 is a hole. A second, short union-find joins every
  hole segment to the foreground segments on its left and right (the pixels on both sides of
  an enclosed background run are foreground), which merges each hole and what it encloses
  into the region around it. Roots are the first segments in raster order, foreground ones,
  so numbering by a running count of roots gives ``scipy.ndimage.label``'s numbers.

The result equals ``_label_regions(fill_holes(mask), connectivity, anomaly_map)`` bit for bit
whenever no pixel of the map is NaN; the caller runs that pair instead when one is (a NaN
pixel inside a hole stays background there, which this pass cannot express).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from torchdefects._runs import _flat_nonzero
from torchdefects.components import _union_find_forest, _union_find_from
from torchdefects.regions import Regions, _empty_regions, _run_stats, _select_index, _take

__all__: List[str] = []


def _fill_label_regions(
    mask: Tensor,
    connectivity: int,
    anomaly_map: Tensor,
    map_ok: Tensor,
    select: bool = False,
    min_area: int = 0,
    max_regions: Optional[int] = None,
) -> Tuple[bool, Tensor, Tensor, Regions]:
    """``(done, labels, counts, regions)`` of the filled mask; see the module docstring.

    Args:
        mask: bool :math:`(B, 1, H, W)` (4-D), not empty.
        connectivity: 4 or 8, of the foreground.
        anomaly_map: float :math:`(B, 1, H, W)` (4-D), for the region scores.
        map_ok: bool :math:`(B, 1, H, W)`, False on the NaN pixels of ``anomaly_map``.

    ``done`` is False (and the rest is not meaningful) when ``map_ok`` is not all True; the
    check costs no extra host synchronization (it rides on the read of the sizes). With
    ``select``, the result is that of :func:`~torchdefects.select_regions` (``min_area``,
    ``max_regions``) on top: the labels of the chosen regions, the number of them per image
    in place of the counts, and the chosen regions in its order.
    """
    b, h, w = mask.shape[0], mask.shape[-2], mask.shape[-1]
    w2, h2 = w + 2, h + 2
    total = b * h2 * w2
    device = mask.device
    padded = F.pad(mask, [1, 1, 1, 1]).view(-1)
    # change[p]: pixel p starts a segment (p >= 1); its running count is p's segment.
    change = padded != F.pad(padded, [1, 0]).narrow(0, 0, total)
    count = torch.cumsum(change, 0, dtype=torch.int64)
    # Segment k covers [start[k], start[k + 1]); start[n] = total is a sentinel.
    start = F.pad(F.pad(_flat_nonzero(change), [1, 0]), [0, 1], value=float(total))
    n = start.shape[0] - 1
    first = start.narrow(0, 0, n)
    stop = start.narrow(0, 1, n)
    node = torch.arange(n, device=device)
    odd = node & 1  # 1 on foreground segments

    # Edges: from each segment, the first segment of its class that it touches in the row
    # above (first n looks) and below (next n), or itself. Foreground looks one column to
    # the left and right further at 8-connectivity (``odd`` is that slack).
    if connectivity == 8:
        lo, hi = first - odd, stop + odd
    else:
        lo, hi = first, stop
    at = torch.cat([lo - w2, lo + w2]).clamp(0, total - 1)
    found = count.gather(0, at)
    me = node.repeat(2)
    # The segment found, or the next one when it is of the other class (classes alternate).
    seg = found + ((found ^ me) & 1)
    # It touches when it starts before this one's end (shifted to its row, plus the slack);
    # a segment of a later row never does.
    bound = torch.cat([hi - w2, hi + w2])
    hit = start.gather(0, seg) < bound
    other = torch.where(hit, seg, me)
    a = torch.cat([me, other])
    c = torch.cat([other, me])

    # Segments holding a row's last (pad) pixel hold a row end: the outside, pinned to 0.
    ends = count.gather(0, torch.arange(w2 - 1, total, w2, device=device))
    root = _union_find_forest(node.index_fill(0, ends, 0), a, c)
    filled = root != 0  # foreground, and background enclosed by it
    # 1 on the holes: the filled segments that are not foreground (odd ones all are).
    hole = filled.to(torch.int64) - odd
    left = node - hole
    right = node + hole
    a2 = [a, node, node, left, right]
    c2 = [c, left, right, node, node]
    if connectivity == 4:
        # At 4-connectivity the foreground around a hole need not be connected: a hole also
        # joins the foreground segment right above and below its first pixel (any other
        # one it touches there is the flank of a hole segment of that row).
        up = found | 1
        touch = (start.gather(0, up) < bound) & (hole.repeat(2) != 0)
        up = torch.where(touch, up, me)
        a2 = a2 + [me, up]
        c2 = c2 + [up, me]
    root = _union_find_from(root, torch.cat(a2), torch.cat(c2))

    # Numbering: roots are the first segments of their regions, in raster order.
    is_root = ((root == node) & filled).to(torch.int64)
    number = torch.cumsum(is_root, 0).gather(0, root)
    row = torch.div(first, w2, rounding_mode="floor")
    image = torch.div(row, h2, rounding_mode="floor")
    counts = torch.zeros(b, dtype=torch.int64, device=device).scatter_add(0, image, is_root)
    last = torch.cumsum(counts, 0)
    before = last - counts
    label = torch.where(filled, number - before.gather(0, image), 0)

    # Region statistics from the filled segments (positions in the padded grid).
    keep = _flat_nonzero(filled)
    x = torch.remainder(first, w2) - 1
    y = torch.remainder(row, h2) - 1
    cols = torch.stack([first, stop - first, x, y, number - 1], 1).index_select(0, keep)
    pos, length, x, y, region = cols.unbind(1)
    # The pixels of the regions, in raster order (one listing, no per-run expansion).
    pixels = _flat_nonzero(filled.gather(0, count))
    num_regions = int(torch.where(map_ok.all(), counts.sum(), -1))
    score_dtype = torch.float64 if anomaly_map.dtype == torch.float64 else torch.float32
    if num_regions < 0:
        return False, counts, counts, _empty_regions(device, score_dtype)
    if num_regions == 0:
        return (
            True,
            _paint_padded(label, count, mask.shape),
            counts,
            _empty_regions(device, score_dtype),
        )
    regions = _run_stats(
        F.pad(anomaly_map, [1, 1, 1, 1]),
        None,
        x,
        x + length - 1,
        length,
        y,
        pos,
        region,
        last,
        before,
        num_regions,
        pixels.shape[0],
        score_dtype,
        True,
        pixels,
    )
    if select:
        # select_regions, with its relabeling folded into the painting: a segment keeps its
        # label when its region (``number``, from 1; 0 outside) is among the chosen rows.
        index, counts = _select_index(regions, b, min_area, max_regions)
        regions = _take(regions, index)
        chosen = torch.zeros(num_regions + 1, dtype=torch.bool, device=device)
        chosen = chosen.index_fill(0, index + 1, True)
        label = torch.where(chosen.gather(0, number), label, 0)
    return True, _paint_padded(label, count, mask.shape), counts, regions


def _paint_padded(label: Tensor, count: Tensor, shape: List[int]) -> Tensor:
    """The label map of shape ``shape`` from the label of each segment of the padded batch."""
    b, h, w = shape[0], shape[2], shape[3]
    painted = label.to(torch.int32).gather(0, count).view(b, 1, h + 2, w + 2)
    return painted.narrow(2, 1, h).narrow(3, 1, w)
