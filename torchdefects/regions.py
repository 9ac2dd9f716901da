"""Per-region statistics by scatter-reduce, and the choice of regions to report.

Statistics are reduced per horizontal run first (a run's pixels are contiguous in
raster order), then per region, in a fixed order: the same bits on every run and
whatever the batch position. Integer statistics (area, bbox, centroid sums) are
exact; score sums accumulate in float64.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from torchdefects._runs import _eager_cpu, _exporting, _flat_nonzero, _owner, _paint, _row_runs
from torchdefects.components import _numbered_runs, connected_components

__all__ = ["Regions", "region_stats", "select_regions"]


class Regions(NamedTuple):
    """Regions of a batch as flat tensors, grouped by image in batch order.

    Attributes:
        batch_index: int64 :math:`(R,)`, image of each region.
        label: int64 :math:`(R,)`, the region's value in the label map.
        area: int64 :math:`(R,)`, pixel count.
        bbox_xyxy: int64 :math:`(R, 4)`, inclusive ``[x1, y1, x2, y2]`` (x = column).
        centroid_xy: float64 :math:`(R, 2)`, mean ``[x, y]`` of the pixels.
        score_max: :math:`(R,)` max of the anomaly map over the region's pixels.
        score_mean: :math:`(R,)` mean of the anomaly map over the region's pixels.
            Both are float32 (float64 for a float64 map), and NaN when no map
            was given.
    """

    batch_index: Tensor
    label: Tensor
    area: Tensor
    bbox_xyxy: Tensor
    centroid_xy: Tensor
    score_max: Tensor
    score_mean: Tensor


def _reduce(values: Tensor, reduce: str, lengths: Tensor, owner: Tensor) -> Tensor:
    """Sum or max of consecutive segments of ``values`` (``lengths``), in a fixed order.

    While exporting (ONNX has no segment reduction) a scatter into the segments'
    ``owner``: max is exact in any order; float sums may then differ in their last bits
    from eager, which rounding the float64 sums to float32 hides but does not exclude.
    """
    if not torch.jit.is_scripting():  # noqa: SIM102
        if _exporting():
            init = float("-inf") if reduce == "max" else 0.0
            out = torch.full(lengths.shape, init, dtype=values.dtype, device=values.device)
            return out.scatter_reduce(0, owner, values, "amax" if reduce == "max" else "sum")
    return torch.segment_reduce(values, reduce, lengths=lengths)


def _bhw(x: Tensor, name: str) -> List[int]:
    """``[B, H, W]`` of a :math:`(B, H, W)` or :math:`(B, 1, H, W)` tensor (no op: the
    functions here read it through ``reshape``)."""
    if x.dim() == 3 or (x.dim() == 4 and x.shape[1] == 1):
        return [x.shape[0], x.shape[-2], x.shape[-1]]
    raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, H, W), got {list(x.shape)}")


def _empty_regions(device: torch.device, score_dtype: torch.dtype) -> Regions:
    i64 = torch.empty(0, dtype=torch.int64, device=device)
    f = torch.empty(0, dtype=score_dtype, device=device)
    return Regions(
        batch_index=i64,
        label=i64,
        area=i64,
        bbox_xyxy=i64.view(0, 4),
        centroid_xy=torch.empty((0, 2), dtype=torch.float64, device=device),
        score_max=f,
        score_mean=f,
    )


def region_stats(labels: Tensor, counts: Tensor, anomaly_map: Optional[Tensor] = None) -> Regions:
    r"""Area, bbox, centroid and scores of every labeled region of a batch.

    Args:
        labels: :math:`(B, H, W)` or :math:`(B, 1, H, W)` integer labels, 0 for
            background and ``1..counts[b]`` for the regions of image ``b``, each
            present and connected along rows (as
            :func:`~torchdefects.connected_components` returns them).
        counts: int :math:`(B,)`, regions per image.
        anomaly_map: optional :math:`(B, H, W)` or :math:`(B, 1, H, W)` float map
            for ``score_max`` / ``score_mean``; NaN pixels are ignored.

    Returns:
        :class:`Regions` ordered by ``(batch_index, label)``. Area, bbox and centroid
        equal ``cv2.connectedComponentsWithStats``; scores equal
        ``scipy.ndimage.maximum`` / ``mean`` per label over the pixels that are not
        NaN. A score is never NaN when a map is given: a region whose pixels are all
        NaN scores ``-inf``. Without a map both scores are NaN.

    Note:
        Two host synchronizations: listing the runs, and reading the number of
        regions and of their pixels (one small read).

    Example:
        >>> mask = torch.tensor([[[1, 1, 0], [0, 0, 0], [0, 1, 1]]])
        >>> labels, counts = connected_components(mask)
        >>> region_stats(labels, counts).area
        tensor([2, 2])
    """
    shape = _bhw(labels, "labels")
    b, h, w = shape[0], shape[1], shape[2]
    if counts.dim() != 1 or counts.shape[0] != b:
        raise ValueError(f"counts must have shape ({b},) to match labels, got {list(counts.shape)}")
    score_dtype = torch.float32
    if anomaly_map is not None:
        map_shape = _bhw(anomaly_map, "anomaly_map")
        if map_shape != shape:
            raise ValueError(f"anomaly_map must have the shape of labels {shape}, got {map_shape}")
        if anomaly_map.dtype == torch.float64:
            score_dtype = torch.float64
    device = labels.device
    if b * h * w == 0:
        return _empty_regions(device, score_dtype)
    if counts.dtype != torch.int64:
        counts = counts.to(torch.int64)
    last_of_image = torch.cumsum(counts, 0)
    first_of_image = last_of_image - counts

    flat_labels = labels.reshape(-1)
    fg = flat_labels != 0
    runs = _row_runs(fg.view(b * h, w), with_count=False)
    row, start, end = runs.row, runs.start, runs.end
    length = end - start
    image = torch.div(row, h, rounding_mode="floor")
    if _exporting():
        y = row - image * h  # ONNX has no remainder by a symbolic scalar
    else:
        y = torch.remainder(row, h)
    first = row * w + start
    # int32 labels: the sums below widen to int64.
    run_label = flat_labels.index_select(0, first)
    # One small read gives the sizes below: the number of regions and of their pixels,
    # or -1 when a label exceeds its image's count.
    bad = (run_label > counts.index_select(0, image)).any()
    num_regions, num_pixels, traced = _read_sizes(counts, length, b * h * w, bad)
    if not traced and num_regions == 0:
        return _empty_regions(device, score_dtype)
    region = first_of_image.index_select(0, image) + run_label - 1

    return _run_stats(
        anomaly_map,
        fg,
        start,
        end - 1,
        length,
        y,
        first,
        region,
        last_of_image,
        first_of_image,
        num_regions,
        num_pixels,
        score_dtype,
    )


def _read_sizes(
    counts: Tensor, length: Tensor, numel: int, bad: Optional[Tensor] = None
) -> Tuple[int, int, bool]:
    """``(num_regions, num_pixels, traced)``: the batch's totals of regions (``counts``) and
    of run pixels (``length``), in one host read (packed in one int64; ``numel`` bounds
    the pixels). ``bad`` (a bool scalar) True raises :class:`ValueError`. While exporting,
    two reads of data-dependent sizes for torch.export (unbacked), no ``bad`` check, and
    ``traced`` is True."""
    if not torch.jit.is_scripting():  # noqa: SIM102
        if _exporting():
            num_regions = counts.sum().item()
            num_pixels = length.sum().item()
            torch._check(num_regions >= 0)
            torch._check(num_pixels >= 0)
            return num_regions, num_pixels, True
    packed = counts.sum() * (numel + 1) + length.sum()
    if bad is not None:
        packed = torch.where(bad, -1, packed)
    sizes = int(packed)
    if sizes < 0:
        raise ValueError("labels hold a label larger than counts for its image")
    return sizes // (numel + 1), sizes % (numel + 1), False


def _run_stats(
    anomaly_map: Optional[Tensor],
    fg: Optional[Tensor],
    start: Tensor,
    last_x: Tensor,
    length: Tensor,
    y: Tensor,
    first: Tensor,
    region: Tensor,
    last_of_image: Tensor,
    first_of_image: Tensor,
    num_regions: int,
    num_pixels: int,
    score_dtype: torch.dtype,
    nan_free: bool = False,
    pixels: Optional[Tensor] = None,
) -> Regions:
    """:class:`Regions` from the runs of the labeled pixels (``fg``, bool), in
    raster order: columns ``start .. last_x`` (``length`` pixels) of row ``y`` of its
    image, flat position ``first`` of its first pixel, and ``region``, its region's
    index over the batch (0-based, ``(batch_index, label)`` order). ``last_of_image``
    and ``first_of_image`` are the inclusive and exclusive running counts of regions
    per image; ``num_regions`` and ``num_pixels`` the totals (positive). ``fg`` is read on
    eager CPU only (may be None elsewhere); ``nan_free``: no region pixel of the map is NaN
    (the NaN handling is skipped); ``pixels``: the flat positions of the run pixels in
    ``anomaly_map``, ascending, when the caller has them (else they are listed here)."""
    device = start.device
    # Scores per run: the map over every run pixel, run after run in raster order.
    if anomaly_map is not None:
        run = length  # each pixel's run: read only while exporting
        if _exporting():
            # ONNX has no repeat_interleave: owners by a prefix count.
            stop = torch.cumsum(length, 0)
            run = _owner(stop, num_pixels)
            shift = first - stop + length
            pos = torch.arange(num_pixels, device=device) + shift.index_select(0, run)
        elif pixels is not None:
            pos = pixels
        elif fg is not None and _eager_cpu(fg):
            # Same positions, listed by NumPy: faster on CPU, and the sync is free there.
            pos = _flat_nonzero(fg.reshape(-1))
        else:
            # Run i's pixels are first[i], first[i] + 1, ...: the pixel's index among all
            # run pixels, shifted by first[i] minus the pixels before run i.
            shift = first - (torch.cumsum(length, 0) - length)
            pos = torch.arange(num_pixels, device=device) + torch.repeat_interleave(
                shift, length, dim=0, output_size=num_pixels
            )
        values = anomaly_map.reshape(-1).index_select(0, pos)
        if values.dtype != score_dtype:
            values = values.to(score_dtype)
        if nan_free:
            run_max = _reduce(values, "max", length, run)
            run_sum = _reduce(values.to(torch.float64), "sum", length, run)
            valid = length
        else:
            # NaN is the one value that differs from itself.
            ok = values == values
            run_max = _reduce(torch.where(ok, values, float("-inf")), "max", length, run)
            run_sum = _reduce(torch.where(ok, values.to(torch.float64), 0.0), "sum", length, run)
            # Pixels that are not NaN, per run (a run is shorter than 2**24: exact in float32).
            valid = _reduce(ok.to(torch.float32), "sum", length, run).to(torch.int64)
    else:
        valid = length
        run_max = torch.empty(0, dtype=score_dtype, device=device)
        run_sum = torch.empty(0, dtype=torch.float64, device=device)

    # Integer statistics, exact: per run, then per region (integer sums and extrema do not
    # depend on the order, so atomics on a GPU give the same bits).
    # A run adds start + ... + last_x to the sum of x.
    sum_x = torch.div((start + last_x) * length, 2, rounding_mode="floor")
    per_run = torch.stack([length, sum_x, y * length, torch.ones_like(length), valid], 1)
    sums = torch.zeros((num_regions, 5), dtype=torch.int64, device=device)
    empty2 = torch.zeros((num_regions, 2), dtype=torch.int64, device=device)
    first_xy = torch.stack([start, y], 1)
    last_xy = torch.stack([last_x, y], 1)
    if _exporting():
        where = region.unsqueeze(1)
        sums = sums.scatter_add(0, where.expand(-1, 5), per_run)
        where2 = where.expand(-1, 2)
        low = empty2.scatter_reduce(0, where2, first_xy, "amin", include_self=False)
        high = empty2.scatter_reduce(0, where2, last_xy, "amax", include_self=False)
    else:
        sums = sums.index_add(0, region, per_run)
        # scatter_reduce, not index_reduce: CUDA's index_reduce refuses to run under
        # torch.use_deterministic_algorithms, even for integer extrema.
        where2 = region.unsqueeze(1).expand(-1, 2)
        low = empty2.scatter_reduce(0, where2, first_xy, "amin", include_self=False)
        high = empty2.scatter_reduce(0, where2, last_xy, "amax", include_self=False)
    area = sums.select(1, 0)
    # int64 over float64: true division in float64, exact operands (below 2**53).
    centroid = sums.narrow(1, 1, 2) / sums.narrow(1, 0, 1).to(torch.float64)

    # Regions are numbered 1..num_regions over the batch; region k (from 1) belongs to
    # the first image whose running count reaches k.
    number = torch.arange(1, num_regions + 1, device=device)
    if _exporting():
        batch_index = _owner(last_of_image, num_regions)  # ONNX has no searchsorted
    else:
        batch_index = torch.searchsorted(last_of_image, number)
    label = number - first_of_image.index_select(0, batch_index)

    if anomaly_map is None:
        nan_scores = torch.full((num_regions,), float("nan"), dtype=score_dtype, device=device)
        score_max, score_mean = nan_scores, nan_scores.clone()
    else:
        score_max = torch.full((num_regions,), float("-inf"), dtype=score_dtype, device=device)
        score_max = score_max.scatter_reduce(0, region, run_max, "amax")
        # Float sums depend on their order: the runs of a region are summed in raster
        # order, the same on every call, device and batch position.
        if _exporting():
            # A scatter needs no order (and ONNX has no stable sort).
            total = _reduce(run_sum, "sum", sums.select(1, 3), region)
        else:
            order = torch.sort(region, stable=True).indices
            total = torch.segment_reduce(
                run_sum.index_select(0, order), "sum", lengths=sums.select(1, 3)
            )
        # float64 over int64: float64.
        if nan_free:
            score_mean = (total / area).to(score_dtype)
        else:
            count = sums.select(1, 4)
            mean = total / count
            score_mean = torch.where(count > 0, mean, float("-inf")).to(score_dtype)

    return Regions(
        batch_index=batch_index,
        label=label,
        area=area,
        bbox_xyxy=torch.cat([low, high], 1),
        centroid_xy=centroid,
        score_max=score_max,
        score_mean=score_mean,
    )


def _label_regions(
    mask: Tensor, connectivity: int = 8, anomaly_map: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Regions]:
    """``connected_components(mask)`` then ``region_stats`` of its labels, in one pass.

    The same ``(labels, counts)`` and :class:`Regions` as the two public functions, bit
    for bit, for :class:`~torchdefects.DefectHead`: the statistics reuse the runs that
    labeling listed and their component numbers, instead of listing the runs of the
    labels again (one ``nonzero`` and about 25 ops fewer), and need no label check.
    One host synchronization beyond labeling's: the number of regions and of their
    pixels, in one read.
    """
    if connectivity != 4 and connectivity != 8:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    shape = _bhw(mask, "mask")
    b, h, w = shape[0], shape[1], shape[2]
    score_dtype = torch.float32
    if anomaly_map is not None:
        map_shape = _bhw(anomaly_map, "anomaly_map")
        if map_shape != shape:
            raise ValueError(f"anomaly_map must have the shape of mask {shape}, got {map_shape}")
        if anomaly_map.dtype == torch.float64:
            score_dtype = torch.float64
    if b * h * w == 0:
        labels, counts = connected_components(mask, connectivity)
        return labels, counts, region_stats(labels, counts, anomaly_map)
    fg = mask if mask.dtype == torch.bool else mask != 0
    runs, number, image, counts, before = _numbered_runs(fg, connectivity)
    labels = _paint(runs, (number - before.index_select(0, image)).to(torch.int32), w)
    labels = labels.reshape(mask.shape)

    row, start, end = runs.row, runs.start, runs.end
    device = mask.device
    if not _exporting() and row.shape[0] == 0:
        # No foreground (known from the shape, no read). Scripted on CUDA, the size read
        # below came out non-zero for an empty 1x1 mask after other calls (H100, torch 2.11).
        return labels, counts, _empty_regions(device, score_dtype)
    length = end - start
    num_regions, num_pixels, traced = _read_sizes(counts, length, b * h * w)
    if not traced and num_regions == 0:
        return labels, counts, _empty_regions(device, score_dtype)
    if _exporting():
        y = row - image * h  # ONNX has no remainder by a symbolic scalar
    else:
        y = torch.remainder(row, h)
    regions = _run_stats(
        anomaly_map,
        fg,
        start,
        end - 1,
        length,
        y,
        row * w + start,
        number - 1,
        before + counts,
        before,
        num_regions,
        num_pixels,
        score_dtype,
    )
    return labels, counts, regions


def _take(regions: Regions, index: Tensor) -> Regions:
    return Regions(
        batch_index=regions.batch_index.index_select(0, index),
        label=regions.label.index_select(0, index),
        area=regions.area.index_select(0, index),
        bbox_xyxy=regions.bbox_xyxy.index_select(0, index),
        centroid_xy=regions.centroid_xy.index_select(0, index),
        score_max=regions.score_max.index_select(0, index),
        score_mean=regions.score_mean.index_select(0, index),
    )


def _select_index(
    regions: Regions, num_images: int, min_area: int, max_regions: Optional[int]
) -> Tuple[Tensor, Tensor]:
    """The rows of ``regions`` that :func:`select_regions` keeps, in its order, and the
    number kept per image (int64 :math:`(B,)`)."""
    device = regions.area.device
    total = regions.area.shape[0]
    drop = regions.area < min_area
    # Lexicographic sort by successive stable sorts, least significant key first; the
    # input is ordered by (batch_index, label) already. A dropped region sorts as if its
    # score were -inf: after every kept region of its image (kept ones that score -inf win
    # the tie on area, as a dropped region is smaller than min_area), so the first
    # max_regions of each image are the kept ones.
    order = torch.sort(regions.area, descending=True, stable=True).indices
    score = torch.where(drop, float("-inf"), regions.score_max).index_select(0, order)
    order = order.index_select(0, torch.sort(score, descending=True, stable=True).indices)
    by_image = torch.sort(regions.batch_index.index_select(0, order), stable=True)
    order = order.index_select(0, by_image.indices)
    batch = by_image.values
    # Rank of each region in its image: its position minus that of the image's first.
    rank = torch.arange(total, device=device) - torch.searchsorted(batch, batch)
    if max_regions is not None:
        # Kept and within the first max_regions: for bools, a > b is a and not b.
        chosen = (rank < max_regions) > drop.index_select(0, order)
    else:
        chosen = ~drop.index_select(0, order)
    index = order.index_select(0, _flat_nonzero(chosen))
    num_regions = torch.zeros(num_images, dtype=torch.int64, device=device)
    num_regions = num_regions.scatter_add(0, batch, chosen.to(torch.int64))
    return index, num_regions


def select_regions(
    labels: Tensor,
    regions: Regions,
    num_images: int,
    min_area: int = 0,
    max_regions: Optional[int] = None,
) -> Tuple[Tensor, Regions, Tensor]:
    r"""Drop small regions, sort the rest and keep the first ``max_regions`` per image.

    Within an image, regions are sorted by ``score_max`` descending, then ``area``
    descending, then ``label`` ascending (NaN scores tie). Kept regions keep their
    label numbers; dropped ones become background in the returned labels.

    Args:
        labels: :math:`(B, H, W)` or :math:`(B, 1, H, W)` int labels that ``regions``
            describes (:func:`region_stats` order).
        regions: :class:`Regions` from :func:`region_stats`.
        num_images: ``B``.
        min_area: regions with fewer pixels are dropped.
        max_regions: at most this many regions per image; ``None`` keeps all.

    Returns:
        ``(labels, regions, num_regions)``: labels with only the kept regions (same
        shape and dtype), the kept :class:`Regions` sorted, and int64
        :math:`(B,)` counts.
    """
    if min_area < 0:
        raise ValueError(f"min_area must be an integer >= 0, got {min_area}")
    if max_regions is not None and max_regions < 1:
        raise ValueError(f"max_regions must be an integer >= 1 or None, got {max_regions}")
    device = regions.area.device
    total = regions.area.shape[0]
    index, num_regions = _select_index(regions, num_images, min_area, max_regions)
    out = _take(regions, index)

    # Nothing dropped: the labels stand (a shortcut that export, with unknown sizes, skips).
    if not _exporting() and out.area.shape[0] == total:
        return labels, out, num_regions
    # Relabel through a table over every (image, label) pair: entry b * (H * W + 1) + l
    # is l if region l of image b is kept, else 0.
    shape = _bhw(labels, "labels")
    b, h, w = shape[0], shape[1], shape[2]
    width = h * w + 1
    key_dtype = labels.dtype if num_images * width < 2**31 else torch.int64
    table = torch.zeros(num_images * width, dtype=labels.dtype, device=device)
    table = table.index_put((out.batch_index * width + out.label,), out.label.to(labels.dtype))
    # Image b's keys start at b * width; the offsets broadcast over (B, [1,] H, W).
    if _exporting():
        # A stepped arange over symbolic sizes makes export guard on its length.
        base = (torch.arange(b, device=device) * width).to(key_dtype)
    else:
        base = torch.arange(0, b * width, width, dtype=key_dtype, device=device)
    keys = labels if labels.dtype == key_dtype else labels.to(key_dtype)
    keys = keys + base.view([b] + [1] * (labels.dim() - 1))
    kept = table.index_select(0, keys.view(-1)).view(labels.shape)
    return kept, out, num_regions
