import cv2
import numpy as np
import pytest
import torch

from tests._shapes import smooth_blobs
from torchdefects import connected_components, region_stats, select_regions
from torchdefects.region_filters import (
    finalize_regions,
    merge_nearby,
    quantile_keep,
    region_keep,
)
from torchdefects.regions import Regions
from torchdefects.shape import solidity


def setup(seed, b=3, h=24, w=31, conn=8, p=None):
    rng = np.random.default_rng(seed)
    if p is None:
        m = np.stack(
            [smooth_blobs(rng, h, w, 0.25) | (rng.random((h, w)) < 0.05) for _ in range(b)]
        )
    else:
        m = rng.random((b, h, w)) < p
    amap = rng.random((b, h, w)).astype(np.float32)
    labels, counts = connected_components(torch.from_numpy(m), conn)
    regions = region_stats(labels, counts, torch.from_numpy(amap))
    return m, amap, labels, counts, regions


def pyimgano_component_keep(comp, amap, min_area, msx, msm, mfr, mar, msol):
    """pyimgano's postprocess_binary_mask filter for one component (from its rules)."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(comp.astype(np.uint8), connectivity=8)
    area = int(stats[1, cv2.CC_STAT_AREA])
    if min_area and area < min_area:
        return False
    vals = amap[comp]
    if msx is not None and vals.max() < msx:
        return False
    if msm is not None and vals.mean() < msm:
        return False
    w, h = stats[1, cv2.CC_STAT_WIDTH], stats[1, cv2.CC_STAT_HEIGHT]
    if mfr is not None and area / (w * h) < mfr:
        return False
    if mar is not None and max(w / h, h / w) > mar:
        return False
    if msol is not None:
        cs, _ = cv2.findContours(comp.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        c = max(cs, key=cv2.contourArea)
        hull = cv2.contourArea(cv2.convexHull(c))
        if hull <= 0 or cv2.contourArea(c) / hull < msol:
            return False
    return True


FILTERS = [
    dict(min_area=3),
    dict(min_score_max=0.9),
    dict(min_score_mean=0.5),
    dict(min_fill_ratio=0.5),
    dict(max_aspect_ratio=2.0),
    dict(min_solidity=0.8),
    dict(min_area=2, min_score_max=0.7, min_fill_ratio=0.3, max_aspect_ratio=3.0, min_solidity=0.6),
]


@pytest.mark.parametrize("kw", FILTERS)
def test_region_keep_matches_pyimgano(kw, device):
    _m, amap, labels, _counts, regions = setup(1)
    sol = solidity(labels, regions) if "min_solidity" in kw else None
    regions = Regions(*[t.to(device) for t in regions])
    keep = region_keep(regions, solidity=sol, **kw).cpu()
    lab = labels.numpy()
    args = [
        kw.get(k)
        for k in (
            "min_score_max",
            "min_score_mean",
            "min_fill_ratio",
            "max_aspect_ratio",
            "min_solidity",
        )
    ]
    for i in range(keep.shape[0]):
        b, lbl = int(regions.batch_index[i]), int(regions.label[i])
        comp = lab[b] == lbl
        # regions' scores are float32 of a float64 mean: compare the mean the same way
        exp = pyimgano_component_keep(comp, amap[b], kw.get("min_area", 0), *args)
        assert bool(keep[i]) == exp, (i, kw)


def test_region_keep_script_and_errors():
    _, _, labels, _counts, regions = setup(2)
    scripted = torch.jit.script(region_keep)
    sol = solidity(labels, regions)
    assert torch.equal(
        scripted(regions, 2, 0.5, 0.3, 0.2, 4.0, 0.5, sol),
        region_keep(regions, 2, 0.5, 0.3, 0.2, 4.0, 0.5, sol),
    )
    with pytest.raises(ValueError, match="solidity must be given"):
        region_keep(regions, min_solidity=0.5)
    with pytest.raises(ValueError, match="solidity must have shape"):
        region_keep(regions, min_solidity=0.5, solidity=sol[:1])


def test_finalize_default_equals_select_regions():
    for seed in range(5):
        _, _, labels, _counts, regions = setup(seed, p=0.3)
        keep = regions.area >= 2
        for mr in (None, 1, 4):
            a = finalize_regions(labels, regions, keep, 3, "score_max", mr)
            b = select_regions(labels, regions, 3, 2, mr)
            assert torch.equal(a[0], b[0])
            for x, y in zip(a[1], b[1]):
                assert torch.equal(x, y)
            assert torch.equal(a[2], b[2])


@pytest.mark.parametrize("sort_by", ["score_max", "score_mean", "area"])
def test_finalize_sort_orders(sort_by, device):
    _, _, labels, _counts, regions = setup(7, p=0.35)
    keep = regions.area >= 1
    labels_d = labels.to(device)
    regions_d = Regions(*[t.to(device) for t in regions])
    lab, out, num, idx = finalize_regions(labels_d, regions_d, keep.to(device), 3, sort_by, 5)
    for b in range(3):
        rows = [i for i in range(keep.shape[0]) if int(regions.batch_index[i]) == b]
        key = lambda i: (  # noqa: E731
            -float(getattr(regions, sort_by)[i]),
            -float(regions.score_max[i]),
            -int(regions.area[i]),
            int(regions.label[i]),
        )
        exp = sorted(rows, key=key)[:5]
        got = [int(i) for i in idx.cpu()[out.batch_index.cpu() == b]]
        assert got == exp
        kept = [int(regions.label[i]) for i in exp]
        ref = np.where(np.isin(labels[b].numpy(), kept), labels[b].numpy(), 0)
        assert np.array_equal(lab[b].cpu().numpy(), ref)
        assert int(num[b]) == len(exp)


def test_finalize_empty_errors_script():
    labels, counts = connected_components(torch.zeros(2, 4, 4, dtype=torch.bool))
    regions = region_stats(labels, counts)
    lab, out, num, _idx = finalize_regions(labels, regions, regions.area > 0, 2, "area", 3)
    assert lab.shape == labels.shape and out.area.shape == (0,) and num.tolist() == [0, 0]
    with pytest.raises(ValueError, match="sort_by must be one of"):
        finalize_regions(labels, regions, regions.area > 0, 2, "size")
    with pytest.raises(ValueError, match="max_regions must be an integer >= 1"):
        finalize_regions(labels, regions, regions.area > 0, 2, "area", 0)
    _, _, labels, counts, regions = setup(3)
    keep = regions.area >= 2
    scripted = torch.jit.script(finalize_regions)
    a, b = (
        scripted(labels, regions, keep, 3, "score_mean", 2),
        finalize_regions(labels, regions, keep, 3, "score_mean", 2),
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])


def test_quantile_matches_numpy():
    rng = np.random.default_rng(0)
    for _ in range(300):
        r, b = int(rng.integers(0, 14)), 3
        bi = torch.from_numpy(np.sort(rng.integers(0, b, r)))
        score = torch.from_numpy(rng.choice(rng.random(6).astype(np.float32), r))
        z = torch.ones(r, dtype=torch.int64)
        regions = Regions(
            bi,
            z,
            z,
            torch.zeros(r, 4, dtype=torch.int64),
            torch.zeros(r, 2, dtype=torch.float64),
            score,
            score,
        )
        keep = torch.from_numpy(rng.random(r) < 0.8)
        q = float(rng.choice([0.0, 1.0, 0.5, 0.25, rng.random()]))
        out = quantile_keep(regions, keep, b, q)
        for img in range(b):
            rows = [i for i in range(r) if int(bi[i]) == img and bool(keep[i])]
            if not rows:
                continue
            thr = float(np.quantile(score.numpy()[rows], q))  # pyimgano: float32 scores
            for i in range(r):
                if int(bi[i]) == img:
                    assert bool(out[i]) == (bool(keep[i]) and float(score[i]) >= thr)
    with pytest.raises(ValueError, match="q must be in"):
        quantile_keep(regions, keep, b, 1.5)
    assert torch.equal(
        torch.jit.script(quantile_keep)(regions, keep, b, 0.3), quantile_keep(regions, keep, b, 0.3)
    )


def oracle_groups(boxes, gap):
    """pyimgano's merge_regions_nearby grouping (union-find over all pairs)."""
    n = len(boxes)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            a, b = boxes[i], boxes[j]
            gx = bx = 0
            if a[2] < b[0]:
                gx = b[0] - a[2] - 1
            elif b[2] < a[0]:
                gx = a[0] - b[2] - 1
            if a[3] < b[1]:
                bx = b[1] - a[3] - 1
            elif b[3] < a[1]:
                bx = a[1] - b[3] - 1
            if gx <= gap and bx <= gap:
                ri, rj = find(i), find(j)
                parent[max(ri, rj)] = min(ri, rj)
    groups = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return groups


@pytest.mark.parametrize("gap", [0, 1, 2, 5])
@pytest.mark.parametrize("conn", [4, 8])
def test_merge_matches_pyimgano_rule_and_union_stats(gap, conn, device):
    for seed in range(6):
        _m, amap, labels, _counts, regions = setup(seed, conn=conn, p=0.12)
        keep = regions.area >= 2
        out = merge_nearby(
            labels.to(device),
            Regions(*[t.to(device) for t in regions]),
            keep.to(device),
            3,
            gap,
            torch.from_numpy(amap).to(device),
        )
        lab, mlab = labels.numpy(), out.labels.cpu().numpy()
        for b in range(3):
            rows = [
                i
                for i in range(keep.shape[0])
                if int(regions.batch_index[i]) == b and bool(keep[i])
            ]
            boxes = [regions.bbox_xyxy[i].tolist() for i in rows]
            groups = oracle_groups(boxes, gap) if gap > 0 else {i: [i] for i in range(len(rows))}
            assert int(out.keep[regions.batch_index == b].sum()) == len(groups)
            for root, members in groups.items():
                ids = [int(regions.label[rows[i]]) for i in members]
                row = rows[root]
                assert int(regions.label[row]) == min(ids) and bool(out.keep[row])
                assert all(int(out.merged_into[rows[i]]) == row for i in members)
                assert int(out.merged_count[row]) == len(members)
                pix = np.isin(lab[b], ids)
                assert (mlab[b][pix] == min(ids)).all()
                ys, xs = np.nonzero(pix)
                assert int(out.regions.area[row]) == pix.sum()
                assert out.regions.bbox_xyxy[row].tolist() == [
                    xs.min(),
                    ys.min(),
                    xs.max(),
                    ys.max(),
                ]
                c = out.regions.centroid_xy[row].cpu().numpy()
                np.testing.assert_allclose(c, [xs.mean(), ys.mean()], rtol=1e-15)
                assert float(out.regions.score_max[row]) == amap[b][pix].max()
                assert float(out.regions.score_mean[row]) == np.float32(
                    amap[b][pix].astype(np.float64).mean()
                )
        # Pixels of the mask never change; dropped regions keep their labels.
        assert np.array_equal(mlab != 0, lab != 0)


def test_merge_no_merge_cases_and_empty():
    _, amap, labels, _counts, regions = setup(1, p=0.1)
    keep = regions.area >= 1
    same = merge_nearby(labels, regions, keep, 3, 0, torch.from_numpy(amap))
    assert same.labels is labels and torch.equal(same.keep, keep)
    labels0, counts0 = connected_components(torch.zeros(2, 3, 3, dtype=torch.bool))
    r0 = region_stats(labels0, counts0)
    out = merge_nearby(labels0, r0, r0.area > 0, 2, 3)
    assert out.keep.shape == (0,)


def test_merge_then_finalize_batch_equals_per_image():
    m, amap, labels, _counts, regions = setup(4, p=0.1)
    keep = regions.area >= 1
    mr = merge_nearby(labels, regions, keep, 3, 2, torch.from_numpy(amap))
    lab, out, _num, _idx = finalize_regions(mr.labels, mr.regions, mr.keep, 3, "area", 4)
    for b in range(3):
        lb, cb = connected_components(torch.from_numpy(m[b : b + 1]), 8)
        rb = region_stats(lb, cb, torch.from_numpy(amap[b : b + 1]))
        mb = merge_nearby(lb, rb, rb.area >= 1, 1, 2, torch.from_numpy(amap[b : b + 1]))
        l1, o1, _n1, _ = finalize_regions(mb.labels, mb.regions, mb.keep, 1, "area", 4)
        assert torch.equal(l1[0], lab[b])
        sel = out.batch_index == b
        for x, y in zip(o1[1:], out[1:]):
            assert torch.equal(x, y[sel])


def test_merge_scripted_equals_eager():
    _, amap, labels, _counts, regions = setup(6, p=0.12)
    keep = regions.area >= 1
    scripted = torch.jit.script(merge_nearby)
    a = scripted(labels, regions, keep, 3, 2, torch.from_numpy(amap))
    b = merge_nearby(labels, regions, keep, 3, 2, torch.from_numpy(amap))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.keep, b.keep)
    assert torch.equal(a.merged_into, b.merged_into)
    for x, y in zip(a.regions, b.regions):
        assert torch.equal(x, y)


def test_merge_cap():
    from tests._shapes import checkerboard

    m = torch.from_numpy(checkerboard(96, 96))[None]
    labels, counts = connected_components(m, 4)
    regions = region_stats(labels, counts)
    with pytest.raises(ValueError, match="at most 4096 kept regions per image, got 4608"):
        merge_nearby(labels, regions, regions.area > 0, 1, 1)


def test_merged_from_ids_for_records():
    from torchdefects.region_filters import merged_from_ids

    _, amap, labels, _counts, regions = setup(4, p=0.1)
    keep = regions.area >= 1
    mr = merge_nearby(labels, regions, keep, 3, 2, torch.from_numpy(amap))
    _, out, _, idx = finalize_regions(mr.labels, mr.regions, mr.keep, 3)
    ids = merged_from_ids(mr.merged_into, regions.label, keep, idx)
    assert len(ids) == idx.shape[0]
    for row, members in zip(idx.tolist(), ids):
        b = int(regions.batch_index[row])
        # The members are exactly the labels whose pixels now carry this row's label.
        now = mr.labels[b].numpy() == int(regions.label[row])
        assert sorted(set(labels[b].numpy()[now].tolist())) == members
        assert min(members) == int(out.label[idx.tolist().index(row)])
    assert any(len(m) > 1 for m in ids)
