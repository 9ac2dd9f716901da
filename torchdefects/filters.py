"""Map conditioning before thresholding: border ignore and smoothing, as pyimgano does it.

pyimgano (``pyimgano.defects.map_ops`` / ``smoothing``) zeroes the border of the map and
then smooths it with OpenCV. These functions do the same on batches, on the map's device,
in plain tensor code (one padded copy, then shifted contiguous slices), so they script and
export:

- :func:`border_ignore` == pyimgano's ``apply_border_ignore_to_map`` (border set to 0.0).
- :func:`smooth_map` == ``cv2.GaussianBlur`` / ``cv2.medianBlur`` / ``cv2.blur`` with
  pyimgano's argument rules (even sizes bumped to odd for gaussian and median, sigma 0 from
  the size, size 0 from sigma), reflect-101 borders for gaussian and box (OpenCV's
  ``BORDER_DEFAULT``) and replicate for median.

The sums run in a fixed order of elementwise operations (no convolution algorithm picks
the order), so results are bit-identical across devices and batch positions.
"""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from torchdefects._check import _as_b1hw, _check_float_map

__all__ = [
    "SMOOTHING_METHODS",
    "border_ignore",
    "gaussian_kernel1d",
    "smooth_map",
    "smoothing_ksize",
]

SMOOTHING_METHODS: Tuple[str, str, str, str] = ("none", "gaussian", "median", "box")


def _small_gaussian(ksize: int) -> List[float]:
    """OpenCV's fixed kernels (getGaussianKernel with sigma <= 0 and an odd size <= 9)."""
    if ksize == 1:
        return [1.0]
    if ksize == 3:
        return [0.25, 0.5, 0.25]
    if ksize == 5:
        return [0.0625, 0.25, 0.375, 0.25, 0.0625]
    if ksize == 7:
        return [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125]
    return [4 / 256, 13 / 256, 30 / 256, 51 / 256, 60 / 256, 51 / 256, 30 / 256, 13 / 256, 4 / 256]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def border_ignore(anomaly_map: Tensor, border_px: int, value: float = 0.0) -> Tensor:
    r"""Set the pixels within ``border_px`` of the image border to ``value`` (pyimgano: 0.0).

    Equals pyimgano's ``apply_border_ignore_to_map``: rows ``0..n-1`` and ``H-n..H-1`` and the
    same columns are set; when ``2 * n >= H`` or ``2 * n >= W`` the whole map is set. With the
    default ``value=0.0`` border pixels are never foreground for a positive threshold (as in
    pyimgano); pass ``value=float("-inf")`` to exclude them for any threshold. The map that
    region scores use is this one (pyimgano scores regions on the processed map); ROI
    statistics come from the raw map.

    Args:
        anomaly_map: :math:`(B, 1, H, W)` or :math:`(B, H, W)` float map.
        border_px: border width in pixels, ``>= 0``; 0 returns the map unchanged.
        value: the value border pixels take.

    Returns:
        A new map of the input's shape and dtype (the input itself when ``border_px == 0``).

    Example:
        >>> border_ignore(torch.ones(1, 1, 4, 5), 1)[0, 0]
        tensor([[0., 0., 0., 0., 0.],
                [0., 1., 1., 1., 0.],
                [0., 1., 1., 1., 0.],
                [0., 0., 0., 0., 0.]])
    """
    _check_float_map(anomaly_map, "anomaly_map")
    if border_px < 0:
        raise ValueError(f"border_px must be an integer >= 0, got {border_px}")
    if border_px == 0:
        return anomaly_map
    x = _as_b1hw(anomaly_map, "anomaly_map")
    h, w = x.shape[2], x.shape[3]
    ys = torch.arange(h, device=x.device).view(h, 1)
    xs = torch.arange(w, device=x.device).view(1, w)
    inside = (ys >= border_px) & (ys < h - border_px) & (xs >= border_px) & (xs < w - border_px)
    out = torch.where(inside, x, torch.full((1,), value, dtype=x.dtype, device=x.device))
    return out.view(anomaly_map.shape)


def smoothing_ksize(method: str, ksize: int, sigma: float = 0.0) -> int:
    """The kernel size pyimgano's smoothing uses, or 0 when it does nothing.

    Rules (pyimgano ``smooth_anomaly_map`` + OpenCV): ``none`` -> 0; ``median``: ``ksize <= 1``
    -> 0, even sizes + 1; ``box``: ``ksize <= 1`` -> 0, even sizes kept (anchor ``k // 2``, as
    ``cv2.blur``); ``gaussian``: ``ksize <= 0`` takes OpenCV's size from sigma
    (``round(8 * sigma + 1) | 1`` for float maps) or 0 when ``sigma <= 0``; even sizes + 1.

    Example:
        >>> smoothing_ksize("gaussian", 0, 1.5), smoothing_ksize("median", 4)
        (13, 5)
    """
    if method != "none" and method != "gaussian" and method != "median" and method != "box":
        raise ValueError(
            f"method must be one of 'none', 'gaussian', 'median', 'box', got '{method}'"
        )
    if not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number, got {sigma}")
    if method == "none":
        return 0
    if method == "gaussian":
        if ksize <= 0:
            if sigma <= 0:
                return 0
            # cvRound(sigma * 4 * 2 + 1) | 1; cvRound rounds half to even, as round() does.
            return int(torch.round(torch.tensor(sigma * 8 + 1, dtype=torch.float64))) | 1
        return ksize + 1 if ksize % 2 == 0 else ksize
    if ksize <= 1:
        return 0
    if method == "median" and ksize % 2 == 0:
        return ksize + 1
    return ksize


def gaussian_kernel1d(ksize: int, sigma: float = 0.0) -> Tensor:
    """OpenCV's ``getGaussianKernel(ksize, sigma, CV_32F)``, bit for bit, as float32 :math:`(k,)`.

    ``sigma <= 0`` means ``0.3 * ((ksize - 1) * 0.5 - 1) + 0.8``, and for sizes up to 9
    OpenCV's fixed kernels. Computed in double as OpenCV's bit-exact kernel
    (half the taps, mirrored, centre tap ``1 / sum``), then rounded to float32. (kornia's
    ``get_gaussian_kernel1d`` has no fixed kernels and normalizes in float32, so it differs
    from OpenCV in the last bits and is not used.)

    Example:
        >>> gaussian_kernel1d(3)
        tensor([0.2500, 0.5000, 0.2500])
    """
    if ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"ksize must be a positive odd integer, got {ksize}")
    if ksize <= 9 and sigma <= 0:
        return torch.tensor(_small_gaussian(ksize), dtype=torch.float32)
    # OpenCV's getGaussianKernelBitExact in double: half the taps, mirrored, the centre 1.
    s = sigma if sigma > 0 else 0.15 * ksize + 0.35
    scale2 = -0.125 / (s * s)
    half = (ksize - 1) // 2
    values: List[float] = []
    total = 0.0
    for i in range(half):
        x = 1 - ksize + 2 * i
        t = math.exp(float(x * x) * scale2)
        values.append(t)
        total += t
    total = total * 2.0 + 1.0
    mul = 1.0 / total
    taps: List[float] = [v * mul for v in values]
    full = taps + [mul] + taps[::-1]
    return torch.tensor(full, dtype=torch.float64).to(torch.float32)


def _reflect101_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    i = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(i)
    # The period as a tensor: ONNX export takes a tensor modulus, not a symbolic int.
    period = torch.full_like(i, 2 * (n - 1))
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def _can_pad(h: int, w: int, top: int, bottom: int, side: int) -> bool:
    """Whether ``F.pad``'s reflect mode applies (each pad below the size) and runs eagerly.

    The check branches on the map's size, which a dynamic-shape export cannot do, so under
    ``torch.export``/tracing the index path (valid for every size) runs instead. Both paths
    build the same padded tensor by copies only, so the results are the same bits.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return top < h and bottom < h and side < w


def _pad_flat(x: Tensor, before: int, after: int, reflect: bool) -> Tuple[Tensor, int]:
    """Pad H and W by ``before``/``after`` (reflect-101, OpenCV's default, or replicate),
    plus one more bottom row, and flatten each image: ``((B, (H+before+after+1) * Wp), Wp)``.

    In the flat layout a shift by ``j`` columns is the slice at offset ``j`` and a shift by
    ``i`` rows the slice at ``i * Wp``: every tap of a separable filter is one contiguous
    slice (shifted views along the last dim are twice as slow to read). Outputs carry
    ``Wp - W`` junk columns per row, dropped by :func:`_unflat`; the extra row keeps the
    slices of the last rows in bounds.
    """
    b, h, w = x.shape[0], x.shape[2], x.shape[3]
    if not reflect:
        p = F.pad(x, [before, after, before, after + 1], mode="replicate")
    elif _can_pad(h, w, before, after + 1, max(before, after)):
        # torch's "reflect" leaves the edge pixel out: OpenCV's BORDER_REFLECT_101.
        p = F.pad(x, [before, after, before, after + 1], mode="reflect")
    else:
        rows = _reflect101_index(h, before, after + 1, x.device)
        cols = _reflect101_index(w, before, after, x.device)
        p = x.index_select(2, rows).index_select(3, cols)
    wp = p.shape[3]
    return p.reshape(b, p.shape[2] * wp), wp


def _unflat(y: Tensor, h: int, w: int, wp: int) -> Tensor:
    """The ``(B, 1, H, W)`` image from a flat ``(B, H * Wp)`` result (junk columns dropped)."""
    return y.reshape(y.shape[0], 1, h, wp).narrow(3, 0, w).contiguous()


def _gaussian_taps(ksize: int, sigma: float) -> List[float]:
    """:func:`gaussian_kernel1d` as Python floats (the float32 values), for scalar products."""
    if ksize <= 9 and sigma <= 0:
        return _small_gaussian(ksize)
    taps: List[float] = gaussian_kernel1d(ksize, sigma).tolist()
    return taps


def _symmetric_pass(flat: Tensor, weights: List[float], step: int, n: int) -> Tensor:
    """``sum_i weights[i] * flat[i * step : i * step + n]`` (flat layout, dim 1) for a
    symmetric odd kernel.

    Mirrored taps are added before the one multiplication they share; the terms are summed
    outermost first, the centre last. A fixed sequence of elementwise ops (temporaries
    updated in place), so the same bits on every device. The weights are float32 values,
    so a float32 product rounds them to themselves.
    """
    k = len(weights)
    r = k // 2
    if r == 0:
        return flat.narrow(1, 0, n) * weights[0]
    acc = flat.narrow(1, 0, n) + flat.narrow(1, (k - 1) * step, n)
    acc.mul_(weights[0])
    for i in range(1, r):
        t = flat.narrow(1, i * step, n) + flat.narrow(1, (k - 1 - i) * step, n)
        t.mul_(weights[i])
        acc.add_(t)
    acc.add_(flat.narrow(1, r * step, n) * weights[r])
    return acc


def _window_sum(flat: Tensor, k: int, step: int, n: int) -> Tensor:
    """``sum_i flat[i * step : i * step + n]`` for ``i < k`` (flat layout, dim 1).

    Sums over windows of 1, 2, 4, ... taps (each one add of two shifted halves), then the
    windows of the binary digits of ``k`` laid end to end: about ``log2(k)`` adds instead of
    ``k - 1``. Used in float64 on float32 data, where the sums are exact, so the grouping
    does not change the result (OpenCV sums box windows in float64 too).
    """
    levels: List[Tensor] = [flat]
    s = 1
    while 2 * s <= k:
        a = levels[-1]
        m = a.shape[1] - s * step
        levels.append(a.narrow(1, 0, m) + a.narrow(1, s * step, m))
        s = 2 * s
    acc = levels[-1].narrow(1, 0, n)
    offset = s
    bit = len(levels) - 2
    while bit >= 0:
        size = 1 << bit
        if k & size:
            acc = acc + levels[bit].narrow(1, offset * step, n)
            offset += size
        bit -= 1
    return acc


def _median_ops(n: int) -> List[Tuple[int, int, int]]:
    """The comparators of a median-of-``n`` selection network, as ``(kind, a, b)``.

    Batcher's odd-even merge sort on the next power of two (the extra slots stand for +inf,
    so comparators that touch them are no-ops or swaps), pruned backwards to what the middle
    output needs. ``kind``: 0 writes ``min`` to ``a`` only, 1 writes ``max`` to ``b`` only,
    2 both, 3 swaps the two slots.
    """
    m = 1
    while m < n:
        m *= 2
    net: List[Tuple[int, int]] = []
    p = 1
    while p < m:
        k = p
        while k >= 1:
            j = k % p
            while j <= m - 1 - k:
                for i in range(min(k - 1, m - j - k - 1) + 1):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        net.append((i + j, i + j + k))
                j += 2 * k
            k = k // 2
        p *= 2
    inf = [s >= n for s in range(m)]
    ops: List[Tuple[int, int, int]] = []
    for a, b in net:
        if inf[b]:
            continue
        if inf[a]:
            ops.append((3, a, b))
            inf[a] = False
            inf[b] = True
        else:
            ops.append((2, a, b))
    need = [False] * m
    need[n // 2] = True
    kept: List[Tuple[int, int, int]] = []
    for idx in range(len(ops) - 1, -1, -1):
        kind, a, b = ops[idx]
        na, nb = need[a], need[b]
        if not (na or nb):
            continue
        if kind == 3:
            kept.append((3, a, b))
            need[a], need[b] = nb, na
        else:
            kept.append((2 if (na and nb) else (0 if na else 1), a, b))
            need[a] = True
            need[b] = True
    kept.reverse()
    return kept


def _median3(flat: Tensor, wp: int, n: int) -> Tensor:
    """3x3 median over a replicate-padded flat map (see :func:`_pad_flat`): each column of
    three is sorted once (shared by the three windows it belongs to); the median is then
    ``med3(max of the lows, med3 of the middles, min of the highs)``, an exact identity for
    3x3 windows."""
    m = n + 2
    a = flat.narrow(1, 0, m)
    b = flat.narrow(1, wp, m)
    c = flat.narrow(1, 2 * wp, m)
    # med3(p, q, r) = clamp(r, min(p, q), max(p, q)): three ops. Buffers of ours are updated
    # in place (clamp_(min=t) is maximum, clamp_(max=t) minimum): fewer live temporaries.
    lo = torch.minimum(a, b)
    hi = torch.maximum(a, b)
    mid = torch.clamp(c, lo, hi)
    lo.clamp_(max=c)
    hi.clamp_(min=c)
    lo_max = torch.maximum(lo.narrow(1, 0, n), lo.narrow(1, 1, n)).clamp_(min=lo.narrow(1, 2, n))
    hi_min = torch.minimum(hi.narrow(1, 0, n), hi.narrow(1, 1, n)).clamp_(max=hi.narrow(1, 2, n))
    m0, m1 = mid.narrow(1, 0, n), mid.narrow(1, 1, n)
    mid_med = torch.clamp(mid.narrow(1, 2, n), torch.minimum(m0, m1), torch.maximum(m0, m1))
    low = torch.minimum(lo_max, mid_med)
    return torch.clamp(hi_min, low, lo_max.clamp_(min=mid_med))


def _median(x: Tensor, ksize: int) -> Tensor:
    """Median of each ``k x k`` window by a selection network of elementwise min/max.

    Exact (a network only moves values), deterministic, and fast: no sort of small windows.
    """
    r = ksize // 2
    h, w = x.shape[2], x.shape[3]
    flat, wp = _pad_flat(x, r, r, False)
    n = h * wp
    if ksize == 3:
        return _unflat(_median3(flat, wp, n), h, w, wp)
    k2 = ksize * ksize
    slots: List[Tensor] = []
    for i in range(ksize):
        for j in range(ksize):
            slots.append(flat.narrow(1, i * wp + j, n))
    m = 1
    while m < k2:
        m *= 2
    for _ in range(m - k2):
        slots.append(slots[0])  # +inf placeholders: the network never reads them
    # owned[s]: slot s holds a buffer of ours (not a view of the input), updated in place
    # (clamp_(max=t) is minimum, clamp_(min=t) maximum): fewer live buffers, more cache hits.
    owned = [False] * m
    for kind, a, b in _median_ops(k2):
        va, vb = slots[a], slots[b]
        if kind == 3:
            slots[a] = vb
            slots[b] = va
            owned[a], owned[b] = owned[b], owned[a]
        elif kind == 0:
            if owned[a]:
                va.clamp_(max=vb)
            else:
                slots[a] = torch.minimum(va, vb)
        elif kind == 1:
            if owned[b]:
                vb.clamp_(min=va)
            else:
                slots[b] = torch.maximum(va, vb)
        elif owned[b]:
            slots[a] = torch.minimum(va, vb)
            vb.clamp_(min=va)
        elif owned[a]:
            slots[b] = torch.maximum(va, vb)
            va.clamp_(max=vb)
        else:
            slots[a] = torch.minimum(va, vb)
            slots[b] = torch.maximum(va, vb)
        if kind == 0 or kind == 2:
            owned[a] = True
        if kind == 1 or kind == 2:
            owned[b] = True
    return _unflat(slots[k2 // 2], h, w, wp)


def smooth_map(anomaly_map: Tensor, method: str, ksize: int = 0, sigma: float = 0.0) -> Tensor:
    r"""Smooth anomaly maps as pyimgano's ``smooth_anomaly_map`` (OpenCV) does, batched.

    - ``gaussian``: ``cv2.GaussianBlur(m, (k, k), sigma)`` with OpenCV's kernel
      (:func:`gaussian_kernel1d`), reflect-101 borders, rows then columns.
    - ``box``: ``cv2.blur(m, (k, k))``, reflect-101 borders, summed in float64 and scaled by
      ``1 / k**2`` in float64 as OpenCV does for float maps.
    - ``median``: ``cv2.medianBlur(m, k)`` with replicated borders. OpenCV takes only
      ``k`` in {3, 5} for float maps (larger sizes raise there); here any odd ``k`` works and
      equals ``scipy.ndimage.median_filter(m, k, mode="nearest")``.
    - ``none``, or a size that :func:`smoothing_ksize` maps to 0: the map unchanged.

    Args:
        anomaly_map: :math:`(B, 1, H, W)` or :math:`(B, H, W)` float map. float16/bfloat16
            maps are computed and returned in float32.
        method: ``"none"``, ``"gaussian"``, ``"median"`` or ``"box"``.
        ksize: kernel size (see :func:`smoothing_ksize` for pyimgano's rules).
        sigma: gaussian sigma, 0 for OpenCV's sigma from the size.

    Returns:
        The smoothed map, the input's shape, float32 (float64 for float64 maps). Equal to
        OpenCV to float32 rounding (the tests: gaussian and box within ``2e-6 *
        max|map|``, median bit-equal). NaN pixels spread through the window.

    Example:
        >>> m = torch.zeros(1, 1, 5, 5)
        >>> m[0, 0, 2, 2] = 1.0
        >>> smooth_map(m, "box", 3)[0, 0, 1:4, 1:4]
        tensor([[0.1111, 0.1111, 0.1111],
                [0.1111, 0.1111, 0.1111],
                [0.1111, 0.1111, 0.1111]])
    """
    _check_float_map(anomaly_map, "anomaly_map")
    k = smoothing_ksize(method, ksize, sigma)
    x = _as_b1hw(anomaly_map, "anomaly_map")
    dtype = _work_dtype(x.dtype)
    x = x.to(dtype)
    if k == 0 or x.numel() == 0:
        return x.view(anomaly_map.shape)
    b, h, w = x.shape[0], x.shape[2], x.shape[3]
    if method == "gaussian":
        # Rows (along W) first, as OpenCV, then columns, over one padded copy: filtering
        # the padded rows equals padding the filtered rows.
        r = k // 2
        wts = _gaussian_taps(k, float(sigma))
        flat, wp = _pad_flat(x, r, r, True)
        rows = _symmetric_pass(flat, wts, 1, (h + 2 * r) * wp)
        out = _unflat(_symmetric_pass(rows, wts, wp, h * wp), h, w, wp)
    elif method == "box":
        # cv2.blur anchors at k // 2 (even sizes too); sums in float64 as OpenCV's.
        flat, wp = _pad_flat(x, k // 2, k - 1 - k // 2, True)
        flat = flat.to(torch.float64)
        rows = _window_sum(flat, k, 1, (h + k - 1) * wp)
        y = _window_sum(rows, k, wp, h * wp).mul_(1.0 / (k * k))
        # The cast reads the strided image and writes it contiguous: no separate copy.
        out = y.reshape(b, 1, h, wp).narrow(3, 0, w).to(dtype).contiguous()
    else:
        out = _median(x, k)
    return out.view(anomaly_map.shape)
