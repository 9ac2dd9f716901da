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

from torchdefects._check import _as_bhw
from torchdefects._runs import _exporting, _paint, _row_runs, _Runs

__all__ = ["connected_components"]


def _run_edges(runs: _Runs, height: int, width: int, connectivity: int) -> Tensor:
    """Edges joining the runs of each component, two per run (fixed size): :math:`(2, 2R)`.

    Column ``e`` is the edge ``(edges[0, e], edges[1, e])``. Two sorted lists of disjoint
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
    # end_j > s - slack and start_j < e + slack. Row 0 looks above, row 1 below.
    base = runs.row * step + runs.start
    at = torch.stack([base - (step + slack), base + (step - slack)]).clamp(0, num_pixels - 1)
    # int32 or int64 indices (as the count): gathers take either, ``where`` widens.
    j = torch.bitwise_right_shift(runs.count[at], 1)
    if _exporting():
        j = j.to(torch.int64)  # ONNX gathers and Where want one index type
    # Checks on keys with a gap row between images (a look never crosses into the next
    # image): run j must start in the row looked at, before e + slack. Past the last
    # run, j = n finds the sentinel, which fails.
    stride = width + 2
    key_row = (runs.row + torch.div(runs.row, height, rounding_mode="floor")) * stride
    first = torch.cat([key_row + runs.start, key_row.new_full((1,), 2**60)])[j]
    at_row = torch.stack([key_row - stride, key_row + stride])
    if slack == 1:
        inside = first <= at_row + runs.end
    else:
        inside = first < at_row + runs.end
    hit = (first >= at_row) & inside
    u = torch.arange(n, device=key_row.device)
    # Rows [u, u, v_above, v_below] read as two rows of 2R: [[u, u], [v_above, v_below]].
    return torch.cat([u.expand(2, n), torch.where(hit, j, u)]).view(2, 2 * n)


def _hook_and_jump(parent: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """One round of union-find, given the smaller and larger parent of every edge's ends.

    Each edge points the larger of the two parents to the smaller
    (``scatter_reduce(amin)``), then three pointer jumps follow. Parents only ever
    point to smaller nodes of the same component, so there is no cycle, and the
    smallest node of a component is its root at the end.
    """
    parent = parent.scatter_reduce(0, high, low, reduce="amin")
    for _ in range(3):
        parent = parent.index_select(0, parent)
    return parent


def _union_find_traced(parent: Tensor, edges: Tensor) -> Tensor:
    """The loop of :func:`_union_find` as a ``while_loop``, for torch.export / compile."""
    from torch._higher_order_ops.while_loop import while_loop

    def cond(p: Tensor) -> Tensor:
        ends = p[edges]
        return (ends[0] != ends[1]).any()

    def body(p: Tensor) -> Tuple[Tensor]:
        low, high = torch.aminmax(p[edges], dim=0)
        return (_hook_and_jump(p, low, high),)

    return while_loop(cond, body, (parent,))[0]


def _union_find(num_nodes: int, edges: Tensor) -> Tensor:
    """Root of every node (the smallest node of its component), int64.

    ``edges`` is :math:`(2, E)`. Rounds of :func:`_hook_and_jump` until the two ends of
    every edge have the same parent. Then every node of a component has one parent
    ``p`` (edges chain them), ``p`` among them, so ``parent[p] == p``: ``p`` is the root
    and the trees are flat. One host synchronization per two rounds (the check); under
    torch.export the loop is a ``while_loop`` (TorchScript cannot compile one).
    """
    low, high = torch.aminmax(edges, dim=0)
    parent = _hook_and_jump(torch.arange(num_nodes, device=edges.device), low, high)
    if not torch.jit.is_scripting():  # noqa: SIM102
        if _exporting():
            return _union_find_traced(parent, edges)
    # The parents of both ends of every edge in one gather, ordered per edge.
    low, high = torch.aminmax(parent[edges], dim=0)
    # Two rounds per check: components of defect masks take three to five rounds, so
    # this halves the host synchronizations for at most one round of extra work.
    while not torch.equal(low, high):
        parent = _hook_and_jump(parent, low, high)
        low, high = torch.aminmax(parent[edges], dim=0)
        parent = _hook_and_jump(parent, low, high)
        low, high = torch.aminmax(parent[edges], dim=0)
    return parent


def _components(fg: Tensor, connectivity: int) -> Tuple[_Runs, Tensor]:
    """Runs of ``fg`` (bool :math:`(B, H, W)`) and the root run of each one's component."""
    b, h, w = fg.shape[0], fg.shape[1], fg.shape[2]
    runs = _row_runs(fg.reshape(b * h, w))
    return runs, _union_find(runs.row.shape[0], _run_edges(runs, h, w, connectivity))


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
    b, h = x.shape[0], x.shape[1]
    fg = x if x.dtype == torch.bool else x != 0
    if b * h * fg.shape[2] == 0:
        counts = torch.zeros(b, dtype=torch.int64, device=mask.device)
        return torch.zeros(mask.shape, dtype=torch.int32, device=mask.device), counts
    runs, root = _components(fg, connectivity)
    # Roots are the first runs of their components, in raster order: a running count of
    # roots, minus the count before each image, numbers them as SciPy does.
    is_root = (root == torch.arange(root.shape[0], device=root.device)).to(torch.int64)
    image = torch.div(runs.row, h, rounding_mode="floor")
    counts = torch.zeros(b, dtype=torch.int64, device=root.device).scatter_add(0, image, is_root)
    before = torch.cumsum(counts, 0) - counts
    label = torch.cumsum(is_root, 0).index_select(0, root) - before.index_select(0, image)
    labels = _paint(runs, label.to(torch.int32), mask.shape[-1])
    return labels.view(mask.shape), counts
