"""Region filters, nearby-fragment merging and the final sort/cap, on the full region table.

pyimgano's order, which these functions follow (its ``extract_defects_from_anomaly_map``):

1. :func:`region_keep`: ``min_area``, ``min_score_max``, ``min_score_mean``,
   ``min_fill_ratio``, ``max_aspect_ratio``, ``min_solidity``, as one keep-mask;
2. :func:`merge_nearby`: fragments whose bboxes are within ``max_gap_px`` merge
   (transitively) into the member with the smallest label;
3. :func:`quantile_keep`: ``min_score_max_quantile``, regions below the per-image quantile of
   the kept regions' ``score_max`` go;
4. :func:`finalize_regions`: sort by ``max_regions_sort_by``, keep ``max_regions`` per image,
   and make the label map hold exactly the reported regions.

All of them work on the table :func:`~torchdefects.region_stats` returns (rows in
``(batch_index, label)`` order, labels ``1..counts[b]``), carried with a bool ``keep`` mask
and compacted once, at the end: the row of a pixel is ``first_row[b] + label - 1``.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from torchdefects._check import _as_bhw
from torchdefects._runs import _flat_nonzero
from torchdefects.regions import Regions, _take, region_stats

__all__ = [
    "MERGE_MAX_REGIONS",
    "SORT_KEYS",
    "MergedRegions",
    "finalize_regions",
    "merge_nearby",
    "merged_from_ids",
    "quantile_keep",
    "region_keep",
]

SORT_KEYS: Tuple[str, str, str] = ("score_max", "score_mean", "area")
# Merging compares every pair of kept regions of an image: B * K * K booleans for the image
# with the most (K) kept regions. Above this many pairs merge_nearby raises.
MERGE_MAX_REGIONS: int = 4096


def _first_row(regions: Regions, num_images: int) -> Tensor:
    """Row of each image's first region in the region_stats table, int64 (B,)."""
    counts = torch.zeros(num_images, dtype=torch.int64, device=regions.area.device)
    counts.index_add_(0, regions.batch_index, torch.ones_like(regions.batch_index))
    return torch.cumsum(counts, 0) - counts


def region_keep(
    regions: Regions,
    min_area: int = 0,
    min_score_max: Optional[float] = None,
    min_score_mean: Optional[float] = None,
    min_fill_ratio: Optional[float] = None,
    max_aspect_ratio: Optional[float] = None,
    min_solidity: Optional[float] = None,
    solidity: Optional[Tensor] = None,
) -> Tensor:
    r"""Which regions pass pyimgano's component filters, as a bool :math:`(R,)` keep-mask.

    A region is dropped when ``area < min_area``, ``score_max < min_score_max``,
    ``score_mean < min_score_mean``, ``fill_ratio < min_fill_ratio`` or
    ``aspect_ratio > max_aspect_ratio`` (pyimgano's strict comparisons, ``fill_ratio`` and
    ``aspect_ratio`` as :func:`~torchdefects.shape_stats`), or, with ``min_solidity``, when
    its solidity is below it or undefined (NaN: zero hull area, which pyimgano drops too).
    ``None`` disables a filter. The scores are the region's on the map it was scored on
    (pyimgano: the border-ignored, smoothed map).

    Args:
        regions: :class:`~torchdefects.Regions`.
        min_area, min_score_max, min_score_mean, min_fill_ratio, max_aspect_ratio,
            min_solidity: the config's values.
        solidity: float :math:`(R,)` from :func:`~torchdefects.solidity`; required when
            ``min_solidity`` is set.

    Example:
        >>> from torchdefects import connected_components, region_stats
        >>> mask = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 1]]])
        >>> labels, counts = connected_components(mask)
        >>> region_keep(region_stats(labels, counts), min_area=2)
        tensor([ True, False])
    """
    keep = regions.area >= min_area
    if min_score_max is not None:
        keep = keep & ~(regions.score_max < min_score_max)
    if min_score_mean is not None:
        keep = keep & ~(regions.score_mean < min_score_mean)
    if min_fill_ratio is not None or max_aspect_ratio is not None:
        box = regions.bbox_xyxy
        width = (box[:, 2] - box[:, 0] + 1).to(torch.float64)
        height = (box[:, 3] - box[:, 1] + 1).to(torch.float64)
        if min_fill_ratio is not None:
            fill = regions.area.to(torch.float64) / (width * height)
            keep = keep & ~(fill < min_fill_ratio)
        if max_aspect_ratio is not None:
            aspect = torch.maximum(width / height, height / width)
            keep = keep & ~(aspect > max_aspect_ratio)
    if min_solidity is not None:
        if solidity is None:
            raise ValueError("solidity must be given when min_solidity is set")
        if solidity.shape != regions.area.shape:
            raise ValueError(
                f"solidity must have shape {list(regions.area.shape)}, got {list(solidity.shape)}"
            )
        keep = keep & (solidity.to(regions.area.device) >= min_solidity)
    return keep


def quantile_keep(regions: Regions, keep: Tensor, num_images: int, q: float) -> Tensor:
    r"""pyimgano's ``min_score_max_quantile``: drop kept regions below the image's quantile.

    Per image, ``t = numpy.quantile(score_max of the kept regions, q)`` (the linear method,
    interpolated in float64 as NumPy does, then rounded to the score dtype as NumPy returns a
    float32 quantile of float32 scores), and a kept region stays when ``score_max >= t``.
    Images without kept regions are unchanged. pyimgano takes the quantile over scores
    rounded to 6 decimals; here the scores are not rounded.

    Args:
        regions: :class:`~torchdefects.Regions` (region_stats order).
        keep: bool :math:`(R,)`, the regions still in.
        num_images: ``B``.
        q: quantile in ``[0, 1]``.

    Returns:
        bool :math:`(R,)`, ``keep`` with the regions below the quantile removed.

    Example:
        >>> from torchdefects import connected_components, region_stats
        >>> mask = torch.tensor([[[1, 0, 1, 0, 1]]])
        >>> labels, counts = connected_components(mask)
        >>> regs = region_stats(labels, counts, torch.tensor([[[0.1, 0, 0.5, 0, 0.9]]]))
        >>> quantile_keep(regs, torch.ones(3, dtype=torch.bool), 1, 0.5)
        tensor([False,  True,  True])
    """
    if not (0.0 <= q <= 1.0):
        raise ValueError(f"q must be in [0, 1], got {q}")
    device = keep.device
    score = regions.score_max
    n = keep.shape[0]
    if n == 0:
        return keep
    # Kept regions of an image first, by score ascending; dropped ones after them.
    # Equal scores are interchangeable here, so no stable sort (which ONNX lacks): rank by
    # score, then sort on the unique key (group, rank).
    by_score = torch.sort(score).indices
    rank = torch.empty_like(by_score).index_copy_(0, by_score, torch.arange(n, device=device))
    group = regions.batch_index * 2 + (~keep).to(torch.int64)
    order = torch.sort(group * n + rank).indices
    sorted_score = score.index_select(0, order).to(torch.float64)
    kept_per_image = torch.zeros(num_images, dtype=torch.int64, device=device)
    kept_per_image.index_add_(0, regions.batch_index, keep.to(torch.int64))
    all_per_image = torch.zeros(num_images, dtype=torch.int64, device=device)
    all_per_image.index_add_(0, regions.batch_index, torch.ones_like(regions.batch_index))
    first = torch.cumsum(all_per_image, 0) - all_per_image
    virtual = q * (kept_per_image - 1).clamp(min=0).to(torch.float64)
    below = torch.floor(virtual)
    gamma = virtual - below
    lo_pos = first + below.to(torch.int64)
    hi_pos = first + torch.minimum(below.to(torch.int64) + 1, (kept_per_image - 1).clamp(min=0))
    lo_pos = lo_pos.clamp(0, n - 1)
    hi_pos = hi_pos.clamp(0, n - 1)
    a = sorted_score.index_select(0, lo_pos)
    b = sorted_score.index_select(0, hi_pos)
    diff = b - a
    # NumPy's _lerp: from the nearer end, so that q = 1 gives the max exactly.
    t = torch.where(gamma >= 0.5, b - diff * (1.0 - gamma), a + diff * gamma)
    t = torch.where(diff == 0, a, t).to(score.dtype)
    return keep & (score >= t.index_select(0, regions.batch_index))


class MergedRegions(NamedTuple):
    """What :func:`merge_nearby` returns.

    Attributes:
        labels: the label map with every merged fragment holding its group's label (the
            smallest label of the group); same shape and dtype as the input.
        regions: the full table with each group's row (the smallest member) holding the
            statistics of the union of its members' pixels.
        keep: bool :math:`(R,)`, the input keep with the non-root members removed.
        merged_into: int64 :math:`(R,)`, the row of each region's group (itself when it
            was not merged or not kept). ``merged_from_ids`` of a kept row ``r`` are the
            labels of the rows ``i`` with ``merged_into[i] == r`` and ``keep_in[i]``.
        merged_count: int64 :math:`(R,)`, members in each row's group (1 when not merged).
    """

    labels: Tensor
    regions: Regions
    keep: Tensor
    merged_into: Tensor
    merged_count: Tensor


def merge_nearby(
    labels: Tensor,
    regions: Regions,
    keep: Tensor,
    num_images: int,
    max_gap_px: int,
    anomaly_map: Optional[Tensor] = None,
) -> MergedRegions:
    r"""Merge kept regions whose bboxes are within ``max_gap_px``, transitively (pyimgano).

    Two kept regions of one image are near when the gaps between their inclusive bboxes are
    both ``<= max_gap_px``, the gap along x being ``max(0, bx1 - ax2 - 1, ax1 - bx2 - 1)``
    (0 for touching or overlapping boxes) and the same along y (pyimgano's
    ``_bbox_gap_px``). Near pairs join groups transitively; a group takes its smallest label.
    Its statistics come from the union of its pixels: :func:`~torchdefects.region_stats` on
    the merged labels, so area, bbox and centroid are exact and the scores are those of the
    union (pyimgano averages the members' rounded means weighted by area, which is the same
    number up to rounding). ``max_gap_px <= 0`` merges nothing (pyimgano). The mask's pixels
    do not change.

    Pairs are compared within an image on a padded ``(B, K, K)`` table, ``K`` the most kept
    regions in one image (one host read); ``K > MERGE_MAX_REGIONS`` raises. Groups form by
    min-label propagation with pointer jumping (one host sync per round, rounds ~ log of the
    longest chain).

    Args:
        labels: int :math:`(B, H, W)` or :math:`(B, 1, H, W)`, from
            :func:`~torchdefects.connected_components`.
        regions: :class:`~torchdefects.Regions` from :func:`~torchdefects.region_stats` on
            ``labels`` (full table, ``(batch_index, label)`` order).
        keep: bool :math:`(R,)`, the regions still in.
        num_images: ``B``.
        max_gap_px: the config's ``merge_nearby_max_gap_px``.
        anomaly_map: the map the regions were scored on, for the union's scores.

    Returns:
        :class:`MergedRegions`.

    Example:
        >>> from torchdefects import connected_components, region_stats
        >>> mask = torch.tensor([[[1, 0, 1, 0, 0, 0, 1]]])
        >>> labels, counts = connected_components(mask)
        >>> regs = region_stats(labels, counts)
        >>> out = merge_nearby(labels, regs, torch.ones(3, dtype=torch.bool), 1, 1)
        >>> out.labels
        tensor([[[1, 0, 1, 0, 0, 0, 3]]], dtype=torch.int32)
        >>> out.keep, out.regions.area
        (tensor([ True, False,  True]), tensor([2, 1, 1]))
    """
    lab = _as_bhw(labels, "labels")
    device = keep.device
    total = keep.shape[0]
    rows = torch.arange(total, device=device)
    same = MergedRegions(labels, regions, keep, rows, torch.ones_like(rows))
    if max_gap_px <= 0 or total < 2:
        return same
    # Slot of each kept region within its image: (B, K) table of rows, -1 padded.
    kept_i64 = keep.to(torch.int64)
    per_image = torch.zeros(num_images, dtype=torch.int64, device=device)
    per_image.index_add_(0, regions.batch_index, kept_i64)
    k = int(per_image.max())
    if k < 2:
        return same
    if k > 4096:  # MERGE_MAX_REGIONS (TorchScript reads no module globals)
        raise ValueError(
            f"merge_nearby compares every pair of kept regions of an image: at most "
            f"4096 kept regions per image, got {k}"
        )
    kept_rows = _flat_nonzero(keep)
    kept_first = torch.cumsum(per_image, 0) - per_image
    kb = regions.batch_index.index_select(0, kept_rows)
    slot = torch.arange(kept_rows.shape[0], device=device) - kept_first.index_select(0, kb)
    table = torch.full((num_images * k,), -1, dtype=torch.int64, device=device)
    table.index_copy_(0, kb * k + slot, kept_rows)
    table = table.view(num_images, k)
    valid = table >= 0
    box = regions.bbox_xyxy.index_select(0, table.clamp(min=0).view(-1)).view(num_images, k, 4)
    x1, y1, x2, y2 = box[..., 0], box[..., 1], box[..., 2], box[..., 3]

    near = (_gap(x1, x2) <= max_gap_px) & (_gap(y1, y2) <= max_gap_px)
    near = near & valid.unsqueeze(2) & valid.unsqueeze(1)
    # Min-slot propagation: every slot takes the smallest slot among its neighbours' roots,
    # then jumps to its root's root, until nothing changes.
    big = k
    root = torch.arange(k, device=device).expand(num_images, k).clone()
    while True:
        cand = torch.where(near, root.unsqueeze(1).expand(num_images, k, k), big).amin(2)
        new = torch.minimum(root, cand)
        new = torch.gather(new, 1, new)
        if bool(torch.equal(new, root)):
            break
        root = new
    root_row = torch.gather(table, 1, root)  # row of each slot's group root
    merged_into = rows.clone()
    merged_into.index_copy_(0, kept_rows, root_row.view(-1).index_select(0, _flat_slots(valid)))
    count = torch.zeros(total, dtype=torch.int64, device=device)
    count.index_add_(0, merged_into, kept_i64)
    merged_count = torch.where(keep, count.index_select(0, merged_into), torch.ones_like(count))
    is_root = keep & (merged_into == rows)
    if bool((merged_count[is_root] == 1).all()):
        return MergedRegions(labels, regions, keep, merged_into, merged_count)

    # Merged labels: a kept pixel takes its group's label; others keep theirs.
    first = _first_row(regions, num_images)
    flat = lab.reshape(-1).to(torch.int64)
    img = torch.arange(lab.shape[0], device=device).view(-1, 1, 1).expand(lab.shape).reshape(-1)
    pix_row = (first.index_select(0, img) + flat - 1).clamp(min=0)
    fg = flat > 0
    pix_keep = fg & keep.index_select(0, pix_row)
    new_label = regions.label.index_select(0, merged_into.index_select(0, pix_row))
    merged_labels = torch.where(pix_keep, new_label, flat).view(lab.shape)
    # Union statistics: region_stats on a compact numbering of the roots (1..n per image).
    roots = _flat_nonzero(is_root)
    root_b = regions.batch_index.index_select(0, roots)
    roots_per_image = torch.zeros(num_images, dtype=torch.int64, device=device)
    roots_per_image.index_add_(0, root_b, torch.ones_like(root_b))
    root_first = torch.cumsum(roots_per_image, 0) - roots_per_image
    compact_of_row = torch.zeros(total, dtype=torch.int64, device=device)
    compact_of_row.index_copy_(
        0,
        roots,
        torch.arange(roots.shape[0], device=device) - root_first.index_select(0, root_b) + 1,
    )
    compact = torch.where(
        pix_keep, compact_of_row.index_select(0, merged_into.index_select(0, pix_row)), 0
    )
    union = region_stats(compact.view(lab.shape).to(lab.dtype), roots_per_image, anomaly_map)
    out = Regions(
        batch_index=regions.batch_index,
        label=regions.label,
        area=regions.area.index_copy(0, roots, union.area),
        bbox_xyxy=regions.bbox_xyxy.index_copy(0, roots, union.bbox_xyxy),
        centroid_xy=regions.centroid_xy.index_copy(0, roots, union.centroid_xy),
        score_max=regions.score_max.index_copy(0, roots, union.score_max),
        score_mean=regions.score_mean.index_copy(0, roots, union.score_mean),
    )
    merged_labels = merged_labels.to(labels.dtype).view(labels.shape)
    return MergedRegions(merged_labels, out, is_root, merged_into, merged_count)


def merged_from_ids(
    merged_into: Tensor, label: Tensor, keep_before: Tensor, rows: Tensor
) -> List[List[int]]:
    """``merged_from_ids`` for records (host side): the member labels of each reported row.

    Args:
        merged_into: :attr:`MergedRegions.merged_into`.
        label: int64 :math:`(R,)`, the table's labels (``regions.label``).
        keep_before: bool :math:`(R,)`, the keep mask passed to :func:`merge_nearby`.
        rows: int64 :math:`(K,)`, the reported rows (``index`` of :func:`finalize_regions`).

    Returns:
        For each reported row, the sorted labels of its group (``[label]`` when not merged;
        pyimgano writes the list only for merged regions).

    Example:
        >>> merged_from_ids(torch.tensor([0, 0, 2]), torch.tensor([1, 2, 3]),
        ...                 torch.tensor([True, True, True]), torch.tensor([2, 0]))
        [[3], [1, 2]]
    """
    into = merged_into.tolist()
    labels = label.tolist()
    kept = keep_before.tolist()
    groups: Dict[int, List[int]] = {}
    for i, root in enumerate(into):
        if kept[i]:
            groups.setdefault(root, []).append(labels[i])
    return [sorted(groups.get(r, [labels[r]])) for r in rows.tolist()]


def _gap(lo: Tensor, hi: Tensor) -> Tensor:
    """Pairwise bbox gap along one axis, (B, K, K): ``max(0, lo_j - hi_i - 1, lo_i - hi_j - 1)``."""
    a = lo.unsqueeze(2) - hi.unsqueeze(1) - 1
    return torch.maximum(torch.maximum(a, a.transpose(1, 2)), torch.zeros_like(a))


def _flat_slots(valid: Tensor) -> Tensor:
    return _flat_nonzero(valid.reshape(-1))


def finalize_regions(
    labels: Tensor,
    regions: Regions,
    keep: Tensor,
    num_images: int,
    sort_by: str = "score_max",
    max_regions: Optional[int] = None,
) -> Tuple[Tensor, Regions, Tensor, Tensor]:
    r"""Sort the kept regions, keep ``max_regions`` per image, relabel the map to match.

    Within an image, regions are sorted by ``sort_by`` descending, then ``score_max``
    descending, ``area`` descending, ``label`` ascending (NaN scores tie and sort first, as
    :func:`~torchdefects.select_regions`); with ``sort_by="score_max"`` this is
    :func:`~torchdefects.select_regions`' order. The label map keeps the pixels of the
    reported regions (a merged group's fragments included) and zeroes the rest.

    Args:
        labels: int :math:`(B, H, W)` or :math:`(B, 1, H, W)`; each pixel's value is the
            label of a row of ``regions`` in its image (after :func:`merge_nearby`, the
            group's label).
        regions: the full :class:`~torchdefects.Regions` table (region_stats order).
        keep: bool :math:`(R,)`.
        num_images: ``B``.
        sort_by: ``"score_max"``, ``"score_mean"`` or ``"area"``.
        max_regions: at most this many per image; ``None`` keeps all.

    Returns:
        ``(labels, regions, num_regions, index)``: the label map with only reported regions,
        the reported :class:`~torchdefects.Regions` sorted, int64 :math:`(B,)` counts, and
        int64 :math:`(K,)` rows of the input table in output order (to gather any other
        per-region tensor: shape statistics, solidity, severity, ``merged_into``).

    Example:
        >>> from torchdefects import connected_components, region_stats
        >>> mask = torch.tensor([[[1, 0, 1, 1, 0, 1]]])
        >>> labels, counts = connected_components(mask)
        >>> regs = region_stats(labels, counts)
        >>> lab, out, n, idx = finalize_regions(labels, regs, regs.area > 0, 1, "area", 1)
        >>> lab, out.label, n
        (tensor([[[0, 0, 2, 2, 0, 0]]], dtype=torch.int32), tensor([2]), tensor([1]))
    """
    if sort_by != "score_max" and sort_by != "score_mean" and sort_by != "area":
        raise ValueError(
            f"sort_by must be one of 'score_max', 'score_mean', 'area', got '{sort_by}'"
        )
    if max_regions is not None and max_regions < 1:
        raise ValueError(f"max_regions must be an integer >= 1 or None, got {max_regions}")
    device = keep.device
    kept = _flat_nonzero(keep)
    out = _take(regions, kept)
    order = torch.sort(out.area, descending=True, stable=True).indices
    score = out.score_max.index_select(0, order)
    order = order.index_select(0, torch.sort(score, descending=True, stable=True).indices)
    if sort_by == "score_mean":
        primary = out.score_mean.index_select(0, order)
        order = order.index_select(0, torch.sort(primary, descending=True, stable=True).indices)
    elif sort_by == "area":
        primary_area = out.area.index_select(0, order)
        order = order.index_select(
            0, torch.sort(primary_area, descending=True, stable=True).indices
        )
    batch = out.batch_index.index_select(0, order)
    order = order.index_select(0, torch.sort(batch, stable=True).indices)
    index = kept.index_select(0, order)
    num_regions = torch.zeros(num_images, dtype=torch.int64, device=device)
    num_regions.index_add_(0, regions.batch_index, keep.to(torch.int64))
    if max_regions is not None:
        first_kept = torch.cumsum(num_regions, 0) - num_regions
        rank = torch.arange(index.shape[0], device=device)
        rank = rank - first_kept.index_select(0, regions.batch_index.index_select(0, index))
        index = index.index_select(0, _flat_nonzero(rank < max_regions))
        num_regions = num_regions.clamp(max=max_regions)
    reported = torch.zeros(keep.shape[0], dtype=torch.bool, device=device)
    reported.index_fill_(0, index, True)
    lab = _as_bhw(labels, "labels")
    first = _first_row(regions, num_images)
    flat = lab.reshape(-1).to(torch.int64)
    img = torch.arange(lab.shape[0], device=device).view(-1, 1, 1).expand(lab.shape).reshape(-1)
    pix_row = (first.index_select(0, img) + flat - 1).clamp(min=0, max=max(keep.shape[0] - 1, 0))
    if keep.shape[0] == 0:
        pix_keep = torch.zeros_like(flat, dtype=torch.bool)
    else:
        pix_keep = (flat > 0) & reported.index_select(0, pix_row)
    new_labels = torch.where(pix_keep, flat, torch.zeros_like(flat)).to(lab.dtype)
    return new_labels.view(labels.shape), _take(regions, index), num_regions, index
