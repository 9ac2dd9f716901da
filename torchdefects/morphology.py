"""Binary morphology on mask batches: flat-square erosion, dilation, opening, closing; hole filling.

Semantics are those of ``kornia.morphology`` with its default ``geodesic`` border, which equal
``cv2.morphologyEx(m, op, np.ones((k, k), np.uint8))`` with OpenCV's default border: pixels
outside the image are ignored (a window is clipped to the image). A flat square is separable,
so each operation is a row pass then a column pass, and each pass is a running boolean OR
(dilation) or AND (erosion) over shifted views of the mask, padded once (both dimensions)
with the neutral value. Windows up to 3 take one shift per offset; wider ones are built by
halving (a window of k is two windows of ceil(k / 2)), so a pass costs ``O(log k)``
whole-mask boolean operations.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from torchdefects._check import _as_b1hw, _check_bool_mask
from torchdefects._runs import _exporting, _paint
from torchdefects.components import _components

__all__ = ["closing", "dilation", "erosion", "fill_holes", "opening"]


def _check_ksize_arg(ksize: int) -> None:
    if ksize < 0 or (ksize > 0 and ksize % 2 == 0):
        raise ValueError(f"ksize must be 0 or an odd integer >= 1, got {ksize}")


def _window_pass(a: Tensor, ksize: int, dim: int, n: int, is_dilation: bool) -> Tensor:
    """OR (dilation) or AND (erosion) over ``ksize`` consecutive entries along ``dim``.

    ``a`` holds ``n + ksize - 1`` entries along ``dim`` (the mask padded with the neutral
    value); entry ``i`` of the result reduces entries ``i .. i + ksize - 1``.
    """
    # Windows above 3 are two windows of s = ceil(k / 2), offset by k - s: the sizes halve
    # down to 3 or less (O(log k) passes), each level needed at n + ksize - k positions.
    sizes = [ksize]
    while sizes[-1] > 3:
        sizes.append((sizes[-1] + 1) // 2)
    k = sizes[-1]
    m = n + ksize - k
    # The smallest window: one shifted view per offset.
    out = a.narrow(dim, 0, m)
    for i in range(1, k):
        if is_dilation:
            out = out | a.narrow(dim, i, m)
        else:
            out = out & a.narrow(dim, i, m)
    for j in range(len(sizes) - 2, -1, -1):
        s = k
        k = sizes[j]
        m = n + ksize - k
        if is_dilation:
            out = out.narrow(dim, 0, m) | out.narrow(dim, k - s, m)
        else:
            out = out.narrow(dim, 0, m) & out.narrow(dim, k - s, m)
    return out


def _square(x: Tensor, ksize: int, is_dilation: bool) -> Tensor:
    """Reduce ``x`` (bool, ``(..., H, W)``) over a centred ``ksize`` square, outside ignored."""
    height, width = x.shape[-2], x.shape[-1]
    if ksize <= 1 or x.shape[0] * height * width == 0:
        return x.clone()
    # A window wider than twice the image covers the whole image from every pixel (the
    # outside is ignored), so every larger square gives the same result: clamp, and a
    # huge ksize costs no more than this one.
    ksize = min(ksize, 2 * max(height, width) + 1)
    r = ksize // 2
    # One pad of both dimensions with the neutral value plays the part of "outside the
    # image is ignored"; the row pass also runs over the padded rows (they stay neutral).
    a = F.pad(x, [r, r, r, r], value=0.0 if is_dilation else 1.0)
    a = _window_pass(a, ksize, -1, width, is_dilation)
    return _window_pass(a, ksize, -2, height, is_dilation)


def _prepare(mask: Tensor, ksize: int) -> Tensor:
    _check_bool_mask(mask, "mask")
    _check_ksize_arg(ksize)
    # Shape check only: the passes work on the last two dimensions of any batch shape,
    # so the mask is used as it is (no squeeze, no reshape back).
    _as_b1hw(mask, "mask")
    return mask


def dilation(mask: Tensor, ksize: int) -> Tensor:
    """Dilate a mask batch with a flat ``ksize`` x ``ksize`` square (outside ignored).

    Args:
        mask: bool :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        ksize: odd side of the square; 0 and 1 return a copy.

    Returns:
        bool tensor with the shape of ``mask``.
    """
    return _square(_prepare(mask, ksize), ksize, True)


def erosion(mask: Tensor, ksize: int) -> Tensor:
    """Erode a mask batch with a flat ``ksize`` x ``ksize`` square (outside ignored).

    Args:
        mask: bool :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        ksize: odd side of the square; 0 and 1 return a copy.

    Returns:
        bool tensor with the shape of ``mask``.
    """
    return _square(_prepare(mask, ksize), ksize, False)


def opening(mask: Tensor, ksize: int) -> Tensor:
    """Opening (erosion then dilation) with a flat ``ksize`` x ``ksize`` square.

    Equals ``kornia.morphology.opening(mask.float(), torch.ones(k, k))`` and
    ``cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((k, k), np.uint8))``, borders included.

    Args:
        mask: bool :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        ksize: 0 (off: a copy is returned) or an odd integer; 1 is the identity.

    Returns:
        bool tensor with the shape of ``mask``.

    Raises:
        TypeError: ``mask`` is not bool.
        ValueError: bad shape, or ``ksize`` negative or even.

    Example:
        >>> m = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
        >>> m[0, 0, 1:4, 1:4] = True
        >>> m[0, 0, 0, 0] = True
        >>> opening(m, 3).sum().item()
        9
    """
    x = _prepare(mask, ksize)
    return _square(_square(x, ksize, False), ksize, True)


def closing(mask: Tensor, ksize: int) -> Tensor:
    """Closing (dilation then erosion) with a flat ``ksize`` x ``ksize`` square.

    Equals ``kornia.morphology.closing(mask.float(), torch.ones(k, k))`` and
    ``cv2.morphologyEx(m, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))``, borders included.

    Args:
        mask: bool :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        ksize: 0 (off: a copy is returned) or an odd integer; 1 is the identity.

    Returns:
        bool tensor with the shape of ``mask``.

    Raises:
        TypeError: ``mask`` is not bool.
        ValueError: bad shape, or ``ksize`` negative or even.

    Example:
        >>> m = torch.ones(1, 1, 5, 5, dtype=torch.bool)
        >>> m[0, 0, 2, 2] = False
        >>> closing(m, 3).all().item()
        True
    """
    x = _prepare(mask, ksize)
    return _square(_square(x, ksize, True), ksize, False)


def fill_holes(mask: Tensor) -> Tensor:
    """Fill holes: background not 4-connected to the image border becomes foreground.

    Equals ``scipy.ndimage.binary_fill_holes`` per image. Batched: the background runs are
    joined into 4-connected components as in :func:`~torchdefects.connected_components`
    (without numbering them); components with a run on the image border stay background,
    the runs of every other one are painted as foreground. No host synchronization beyond
    listing the runs and the rounds of union-find.

    Args:
        mask: bool :math:`(B, 1, H, W)` or :math:`(B, H, W)`.

    Returns:
        bool tensor with the shape of ``mask``.

    Example:
        >>> m = torch.ones(1, 5, 5, dtype=torch.bool)
        >>> m[0, 2, 2] = False
        >>> fill_holes(m).all().item()
        True
    """
    _check_bool_mask(mask, "mask")
    _as_b1hw(mask, "mask")  # shape check; the mask is used in its own shape
    height, width = mask.shape[-2], mask.shape[-1]
    if mask.shape[0] * height * width == 0:
        return mask.clone()
    runs, root = _components(~mask, 4)
    if _exporting():
        y = runs.row - torch.div(runs.row, height, rounding_mode="floor") * height
    else:
        y = torch.remainder(runs.row, height)
    # Distance of a run to the nearest image border (0: on the border), >= 0.
    gap = torch.minimum(
        torch.minimum(y, (height - 1) - y), torch.minimum(runs.start, width - runs.end)
    )
    # Per component, its least gap, gathered at the root (a root is among its own
    # members; other entries are never read).
    least = gap.scatter_reduce(0, root, gap, reduce="amin")
    is_hole = least.index_select(0, root) > 0
    return mask | _paint(runs, is_hole, width).view(mask.shape)
