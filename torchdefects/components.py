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

from typing import Tuple

import torch
from torch import Tensor

from torchdefects._runs import _exporting, _paint, _row_runs, _Runs

__all__ = ["connected_components"]


def _run_edges(runs: _Runs, height: int, width: int, connectivity: int) -> Tuple[Tensor, Tensor]:
    """Edges ``(a[e], b[e])`` joining the runs of each component: two per run, each listed
    in both directions, :math:`4R` (fixed size).

    Two sorted lists of disjoint
    intervals (the runs of two consecutive rows) overlap in a staircase: every
    overlapping pair ``(i, j)`` has ``j`` the first run of its row that overlaps ``i``,
    or ``i`` the first run of its row that overlaps ``j``. So each run looks up the
    first run it may overlap in the row above and in the row below: the run at, or
    next after, column ``start - slack`` of that row, which the change count gives in
    one gather. A look that finds no overlap gives a self-loop ``(i, i)``, which
    union-find ignores. No host synchronization.
    """
    n = runs.row.shape[0]
    slack = 1 if connectivity == 8 else 0
    num_pixels = runs.count.shape[0]
    step = width + 1
    # Run j of row r +- 1 overlaps run i (columns s..e-1) of row r when
    # end_j > s - slack and start_j < e + slack. The first n looks go above, the
    # next n below.
    base = runs.row * step + runs.start
    at = torch.cat([base - (step + slack), base + (step - slack)]).clamp(0, num_pixels - 1)
    # int32 or int64 indices (as the count): gathers take either, ``where`` widens.
    j = torch.bitwise_right_shift(runs.count.index_select(0, at), 1)
    if _exporting():
        j = j.to(torch.int64)  # ONNX gathers and Where want one index type
    # Checks on keys with a gap row between images (a look never crosses into the next
    # image): run j must start in the row looked at, before e + slack. Past the last
    # run, j = n finds the sentinel, which fails.
    stride = width + 2
    key_row = (runs.row + torch.div(runs.row, height, rounding_mode="floor")) * stride
    first = torch.cat([key_row + runs.start, key_row.new_full((1,), 2**60)]).index_select(0, j)
    at_row = torch.cat([key_row - stride, key_row + stride])
    if slack == 1:
        inside = first <= at_row + runs.end.repeat(2)
    else:
        inside = first < at_row + runs.end.repeat(2)
    hit = (first >= at_row) & inside
    u = torch.arange(n, device=key_row.device).repeat(2)
    v = torch.where(hit, j, u)
    # Every edge in both directions: ends [u, u, v_above, v_below] against
    # [v_above, v_below, u, u].
    return torch.cat([u, v]), torch.cat([v, u])


def _hook_and_jump(parent: Tensor, pa: Tensor, pb: Tensor) -> Tensor:
    """One round of union-find, given the parents ``pa``, ``pb`` of the ends of every edge.

    Edges come in both directions, and each points its first end's parent to the other's
    when that is smaller (``scatter_reduce(amin)``; a larger one changes nothing, as a
    parent is never larger than its node): the larger of the two parents goes to the
    smaller. Then four pointer jumps follow (fewer rounds than three on defect masks,
    spirals and percolation clusters). Parents only ever point to smaller nodes of the
    same component, so there is no cycle, and the smallest node of a component is its
    root at the end.
    """
    parent = parent.scatter_reduce(0, pa, pb, reduce="amin")
    # gather, not index_select: the same 1-D read, with about half the host cost per call
    # on CUDA (index_select goes through gather and a copy there).
    for _ in range(4):
        parent = parent.gather(0, parent)
    return parent


def _union_find_traced(parent: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The loop of :func:`_union_find` as a ``while_loop``, for torch.export / compile."""
    from torch._higher_order_ops.while_loop import while_loop

    def cond(p: Tensor) -> Tensor:
        return (p.gather(0, a) != p.gather(0, b)).any()

    def body(p: Tensor) -> Tuple[Tensor]:
        return (_hook_and_jump(p, p.gather(0, a), p.gather(0, b)),)

    return while_loop(cond, body, (parent,))[0]


def _union_find(num_nodes: int, a: Tensor, b: Tensor) -> Tensor:
    """Root of every node (the smallest node of its component), int64.

    ``(a[e], b[e])`` are the edges, each in both directions. Rounds of
    :func:`_hook_and_jump` until the two ends of every edge have the same parent. Then
    every node of a component has one parent ``p`` (edges chain them), ``p`` among
    them, so ``parent[p] == p``: ``p`` is the root and the trees are flat. One host
    synchronization per two rounds (the check); under torch.export the loop is a
    ``while_loop`` (TorchScript cannot compile one).
    """
    return _union_find_forest(torch.arange(num_nodes, device=a.device), a, b)


def _union_find_forest(parent: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """:func:`_union_find` from ``parent``: every node its own root, or a child of a
    smaller root (a component known in advance, pinned to its root)."""
    # Roots hook as they are: the first round needs no gather of parents.
    parent = _hook_and_jump(parent, a, b)
    if not torch.jit.is_scripting():  # noqa: SIM102
        if _exporting():
            return _union_find_traced(parent, a, b)
    parent = _hook_and_jump(parent, parent.gather(0, a), parent.gather(0, b))
    pa = parent.gather(0, a)
    pb = parent.gather(0, b)
    # Checks after rounds 2, 4, 6, ...: components of defect masks take one to five
    # rounds, so this halves the host synchronizations for at most one extra round.
    while not torch.equal(pa, pb):
        parent = _hook_and_jump(parent, pa, pb)
        parent = _hook_and_jump(parent, parent.gather(0, a), parent.gather(0, b))
        pa = parent.gather(0, a)
        pb = parent.gather(0, b)
    return parent


def _union_find_from(parent: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """:func:`_union_find` from a finished forest ``parent`` and edges ``(a, b)`` of which
    only a few join two of its trees: a check before every round (none when ``parent``
    already joins every edge)."""
    pa = parent.gather(0, a)
    pb = parent.gather(0, b)
    while not torch.equal(pa, pb):
        parent = _hook_and_jump(parent, pa, pb)
        pa = parent.gather(0, a)
        pb = parent.gather(0, b)
    return parent


def _components(fg: Tensor, connectivity: int) -> Tuple[_Runs, Tensor]:
    """Runs of ``fg`` (bool :math:`(B, H, W)` or :math:`(B, 1, H, W)`) and the root run
    of each one's component."""
    h, w = fg.shape[-2], fg.shape[-1]
    runs = _row_runs(fg.reshape(-1, w))
    if not _exporting() and runs.row.shape[0] == 0:
        # No run (known from the shape). Scripted on CUDA, edges of no run came out with
        # the wrong dtype after other calls (H100, torch 2.11): nothing to join anyway.
        return runs, runs.row.clone()
    a, b = _run_edges(runs, h, w, connectivity)
    return runs, _union_find(runs.row.shape[0], a, b)


def _numbered_runs(fg: Tensor, connectivity: int) -> Tuple[_Runs, Tensor, Tensor, Tensor, Tensor]:
    """Runs of ``fg`` (bool :math:`(B, H, W)` or :math:`(B, 1, H, W)`, not empty) and
    their components, numbered.

    Returns ``(runs, number, image, counts, before)``: each run's component number over
    the whole batch (1-based, in raster order of the components' first pixels), each
    run's image, the components per image (int64 :math:`(B,)`) and the components of
    the images before each image. The label of a run is ``number - before[image]``.
    """
    b, h = fg.shape[0], fg.shape[-2]
    runs, root = _components(fg, connectivity)
    # Roots are the first runs of their components, in raster order: a running count of
    # roots, minus the count before each image, numbers them as SciPy does.
    is_root = (root == torch.arange(root.shape[0], device=root.device)).to(torch.int64)
    image = torch.div(runs.row, h, rounding_mode="floor")
    counts = torch.zeros(b, dtype=torch.int64, device=root.device).scatter_add(0, image, is_root)
    before = torch.cumsum(counts, 0) - counts
    number = torch.cumsum(is_root, 0).index_select(0, root)
    return runs, number, image, counts, before


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
    if mask.dim() != 3 and not (mask.dim() == 4 and mask.shape[1] == 1):
        raise ValueError(f"mask must have shape (B, 1, H, W) or (B, H, W), got {list(mask.shape)}")
    # Used in its own shape: the runs are listed over its rows, whatever the leading dims.
    fg = mask if mask.dtype == torch.bool else mask != 0
    if mask.shape[0] * mask.shape[-2] * mask.shape[-1] == 0:
        counts = torch.zeros(mask.shape[0], dtype=torch.int64, device=mask.device)
        return torch.zeros(mask.shape, dtype=torch.int32, device=mask.device), counts
    runs, number, image, counts, before = _numbered_runs(fg, connectivity)
    label = number - before.index_select(0, image)
    labels = _paint(runs, label.to(torch.int32), mask.shape[-1])
    return labels.reshape(mask.shape), counts
