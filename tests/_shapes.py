"""Adversarial binary masks shared by the tests (NumPy, bool)."""

import numpy as np


def spiral(n: int) -> np.ndarray:
    """A one-pixel-wide square spiral with a one-pixel gap between turns."""
    m = np.zeros((n, n), dtype=bool)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        m[top, left : right + 1] = True
        m[top : bottom + 1, right] = True
        if top + 2 <= bottom:
            m[bottom, left : right + 1] = True
        if left + 2 <= right and top + 2 <= bottom:
            m[top + 2 : bottom + 1, left] = True
            if top + 2 < bottom - 1:
                m[top + 2, left : left + 1] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            m[top, left - 2 : left] = True
    return m


def serpentine(h: int, w: int, vertical: bool = False) -> np.ndarray:
    """Lines every other row, joined alternately at the right and left ends."""
    if vertical:
        return serpentine(w, h).T.copy()
    m = np.zeros((h, w), dtype=bool)
    m[::2, :] = True
    for i, r in enumerate(range(1, h, 2)):
        m[r, w - 1 if i % 2 == 0 else 0] = True
    return m


def checkerboard(h: int, w: int) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) % 2 == 0).astype(bool)


def diagonal_stripes(h: int, w: int, period: int = 3) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) % period == 0).astype(bool)


def smooth_blobs(rng: np.random.Generator, h: int, w: int, frac: float) -> np.ndarray:
    """Smooth random blobs covering about ``frac`` of the image (defect-like)."""
    import scipy.ndimage as ndi

    noise = ndi.gaussian_filter(rng.standard_normal((h, w)), sigma=max(1.0, min(h, w) / 24))
    return noise >= np.quantile(noise, 1 - frac)


def adversarial_masks():
    """(name, mask) pairs of hard cases."""
    rng = np.random.default_rng(7)
    yield "spiral", spiral(61)
    yield "spiral_even", spiral(40)
    yield "serpentine", serpentine(63, 40)
    yield "serpentine_vertical", serpentine(40, 63, vertical=True)
    yield "checkerboard", checkerboard(17, 23)
    yield "stripes", diagonal_stripes(20, 31)
    yield "anti_stripes", diagonal_stripes(20, 31)[:, ::-1].copy()
    yield "empty", np.zeros((9, 11), bool)
    yield "full", np.ones((9, 11), bool)
    yield "one_by_n", rng.random((1, 57)) < 0.5
    yield "n_by_one", rng.random((57, 1)) < 0.5
    yield "one_by_one_on", np.ones((1, 1), bool)
    yield "one_by_one_off", np.zeros((1, 1), bool)
    border = np.zeros((15, 15), bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    border[5:10, 5:10] = True
    yield "border_ring", border
    corners = np.zeros((8, 8), bool)
    corners[0, 0] = corners[0, -1] = corners[-1, 0] = corners[-1, -1] = True
    corners[1, 1] = corners[6, 1] = True
    yield "corners", corners
    yield "blobs", smooth_blobs(rng, 64, 80, 0.05)
    yield "percolation", rng.random((64, 64)) < 0.59
