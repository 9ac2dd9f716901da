"""DefectHead with the toolbox stages (issue 11): the head against its oracles.

Oracles: ``pyimgano_extract`` (pyimgano's extractor rewritten with OpenCV and NumPy, in
tests/test_toolbox_pipeline.py) region by region, and ``scripts/render_presets.py``'s
``toolbox_pipeline`` (the eager composition of the public stage functions) bit-equal. Also
batch == per image, scripted == eager, and a config whose toolbox fields are all neutral
gives exactly the composition of the plain stages (the head before the toolbox).
"""

import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from tests.test_toolbox_pipeline import CASES, pyimgano_extract, toolbox_pipeline
from torchdefects import (
    DefectHead,
    DefectsConfig,
    closing,
    connected_components,
    fill_holes,
    merge_nearby,
    opening,
    region_keep,
    region_stats,
    select_regions,
    shape_stats,
    solidity,
)
from torchdefects.config import UNSUPPORTED_UNTIL_IMPLEMENTED

THR = 0.6

#: Every stage at once (smoothing, border, hysteresis, morphology, dilation, all filters,
#: merging, quantile, sort, cap), and variants.
EVERY = dict(
    border_ignore_px=2,
    map_smoothing_method="gaussian",
    map_smoothing_ksize=5,
    hysteresis_enabled=True,
    hysteresis_low=0.5,
    open_ksize=3,
    close_ksize=3,
    mask_dilate_ksize=3,
    min_area=3,
    min_score_max=0.62,
    min_score_mean=0.52,
    min_fill_ratio=0.2,
    max_aspect_ratio=6.0,
    merge_nearby_enabled=True,
    merge_nearby_max_gap_px=4,
    min_score_max_quantile=0.25,
    max_regions_sort_by="score_mean",
    max_regions=4,
)
HEAD_CASES = [
    *CASES,
    EVERY,
    dict(EVERY, map_smoothing_method="median", map_smoothing_ksize=5, max_regions_sort_by="area"),
    dict(EVERY, map_smoothing_method="box", hysteresis_enabled=False, fill_holes=True),
    dict(EVERY, min_solidity=0.6, merge_nearby_enabled=False),
    dict(mask_dilate_ksize=5, merge_nearby_enabled=True, merge_nearby_max_gap_px=3),
]
SCRIPTABLE = [c for c in HEAD_CASES if c.get("min_solidity") is None]


def _maps(seed, b=3, h=48, w=64):
    rng = np.random.default_rng(seed)
    maps = np.stack([ndi.gaussian_filter(rng.random((h, w)), 1.5) for _ in range(b)])
    maps = ((maps - maps.min()) / (maps.max() - maps.min())).astype(np.float32)
    return torch.from_numpy(maps)[:, None]


def _cfg(kw):
    return DefectsConfig(**{"pixel_threshold": THR, "connectivity": 8, **kw})


def _assert_same(a, b):
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.num_regions, b.num_regions)
    for f, u, v in zip(a.regions._fields, a.regions, b.regions):
        assert u.dtype == v.dtype and torch.equal(u, v), f
    for f in ("roi_max", "roi_mean", "pixel_threshold", "image_score", "image_label"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for f in ("solidity", "merged_from"):
        u, v = getattr(a, f), getattr(b, f)
        assert (u is None) == (v is None), f
        if u is not None:
            assert torch.equal(u.nan_to_num(-1.0), v.nan_to_num(-1.0)), f


@pytest.mark.parametrize("kw", HEAD_CASES, ids=range(len(HEAD_CASES)))
def test_head_equals_toolbox_pipeline(kw):
    x = _maps(len(str(kw)))
    out = DefectHead(_cfg(kw))(x)
    labels, regions = toolbox_pipeline(
        x, torch.full((3,), THR, dtype=torch.float64), {"connectivity": 8, **kw}
    )
    assert torch.equal(out.labels, labels.view(out.labels.shape))
    for f, u, v in zip(regions._fields, out.regions, regions):
        assert torch.equal(u, v), f
    # ROI statistics come from the raw map, whatever the conditioning.
    assert torch.equal(out.roi_max, x.flatten(1).amax(1))


@pytest.mark.parametrize("kw", CASES, ids=range(len(CASES)))
def test_head_equals_pyimgano_extractor(kw):
    """Independent oracle: OpenCV components and NumPy stats, per image.

    The maps are test_toolbox_pipeline's. Where the quantile lands exactly on a region's
    score, pyimgano compares its 6-decimal rounded score with the float32 quantile of the
    rounded scores and can drop that region (docs/postprocessing.md: we do not round).
    """
    x = _maps(len(str(kw)))
    out = DefectHead(_cfg(kw))(x)
    shape = shape_stats(out.regions)
    for b in range(3):
        ref = pyimgano_extract(x[b, 0].numpy(), THR, {"connectivity": 8, **kw})
        sel = (out.regions.batch_index == b).nonzero().view(-1).tolist()
        assert len(sel) == len(ref) == int(out.num_regions[b])
        for i, r in zip(sel, ref):
            assert out.regions.bbox_xyxy[i].tolist() == [int(v) for v in r["bbox"]]
            assert int(out.regions.area[i]) == r["area"]
            assert abs(float(out.regions.score_max[i]) - r["score_max"]) <= 1e-6
            assert abs(float(out.regions.score_mean[i]) - r["score_mean"]) <= 2e-6
            w = r["bbox"][2] - r["bbox"][0] + 1
            assert int(shape.bbox_area[i]) == w * (r["bbox"][3] - r["bbox"][1] + 1)


@pytest.mark.parametrize("kw", HEAD_CASES, ids=range(len(HEAD_CASES)))
def test_batch_equals_per_image(kw):
    x = _maps(len(str(kw)) + 2)
    head = DefectHead(_cfg(kw))
    whole = head(x)
    start = 0
    for b in range(x.shape[0]):
        one = head(x[b : b + 1])
        n = int(whole.num_regions[b])
        assert int(one.num_regions[0]) == n
        assert torch.equal(one.labels[0], whole.labels[b])
        for f, u, v in zip(one.regions._fields, one.regions, whole.regions):
            if f != "batch_index":
                assert torch.equal(u, v[start : start + n]), f
        if whole.merged_from is not None:
            rows = whole.merged_from[:, 0]
            sel = (rows >= start) & (rows < start + n)
            part = whole.merged_from[sel] - torch.tensor([start, 0])
            assert torch.equal(one.merged_from, part)
        if whole.solidity is not None:
            assert torch.equal(
                one.solidity.nan_to_num(-1.0), whole.solidity[start : start + n].nan_to_num(-1.0)
            )
        start += n


@pytest.mark.parametrize("kw", SCRIPTABLE[::2] + [EVERY], ids=range(len(SCRIPTABLE[::2]) + 1))
def test_scripted_equals_eager(kw):
    x = _maps(len(str(kw)) + 3)
    head = DefectHead(_cfg(kw))
    _assert_same(torch.jit.script(head)(x), head(x))


def test_scripting_with_min_solidity_is_a_clear_error():
    head = DefectHead(_cfg(dict(min_solidity=0.5)))
    with pytest.raises(ValueError, match=r"min_solidity=0.5 is not supported in scripted heads"):
        torch.jit.script(head)


def test_neutral_toolbox_equals_the_plain_stages():
    """All toolbox fields at their neutral values: the composition the head had before."""
    neutral = dict(
        border_ignore_px=0,
        map_smoothing_method="gaussian",  # ksize 0 and sigma 0: smoothing does nothing
        map_smoothing_ksize=0,
        hysteresis_enabled=False,
        mask_dilate_ksize=0,
        merge_nearby_enabled=True,  # with a gap of 0 nothing merges
        merge_nearby_max_gap_px=0,
        max_regions_sort_by="score_max",
    )
    plain = dict(open_ksize=3, close_ksize=3, fill_holes=True, min_area=4, max_regions=3)
    x = _maps(7)
    x[0, 0, 5, 5] = float("nan")
    for kw in (plain, dict(plain, **neutral)):
        out = DefectHead(_cfg(kw))(x)
        mask = opening(x >= THR, 3)
        mask = fill_holes(closing(mask, 3) & (x == x)) & (x == x)
        labels, counts = connected_components(mask, 8)
        labels, regions, num = select_regions(labels, region_stats(labels, counts, x), 3, 4, 3)
        assert torch.equal(out.labels, labels) and torch.equal(out.num_regions, num)
        for f, u, v in zip(regions._fields, out.regions, regions):
            assert torch.equal(u, v), f
        assert out.solidity is None and out.merged_from is None
    # The scripted graph of the neutral toolbox config is the plain one (Final flags).
    a = torch.jit.script(DefectHead(_cfg(plain)))
    b = torch.jit.script(DefectHead(_cfg(dict(plain, **neutral))))
    assert str(a.graph_for(x) if hasattr(a, "graph_for") else a.graph).count("aten::") == str(
        b.graph_for(x) if hasattr(b, "graph_for") else b.graph
    ).count("aten::")


def test_merged_from_and_solidity():
    x = _maps(11)
    kw = dict(merge_nearby_enabled=True, merge_nearby_max_gap_px=3, max_regions=5)
    out = DefectHead(_cfg(kw))(x)
    # Oracle: SciPy labels (raster order, as ours), pyimgano's pairwise rule, union-find.
    merged_any = False
    for b in range(3):
        lab, n = ndi.label(x[b, 0].numpy() >= THR, np.ones((3, 3)))
        boxes = [
            (s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1) for s in ndi.find_objects(lab)
        ]
        parent = list(range(n + 1))

        def find(i, parent=parent):
            while parent[i] != i:
                i = parent[i]
            return i

        for i in range(1, n + 1):
            for j in range(i + 1, n + 1):
                a, c = boxes[i - 1], boxes[j - 1]
                gx = max(0, c[0] - a[2] - 1, a[0] - c[2] - 1)
                gy = max(0, c[1] - a[3] - 1, a[1] - c[3] - 1)
                if gx <= 3 and gy <= 3:
                    ri, rj = find(i), find(j)
                    parent[max(ri, rj)] = min(ri, rj)
        sel = (out.regions.batch_index == b).nonzero().view(-1).tolist()
        for i in sel:
            got = out.merged_from[out.merged_from[:, 0] == i, 1].tolist()
            root = int(out.regions.label[i])
            want = [k for k in range(1, n + 1) if find(k) == root]
            assert got == want
            merged_any |= len(want) > 1
    assert merged_any
    # Solidity of the reported regions == shape.solidity on the final labels.
    kw = dict(min_area=2, min_solidity=0.3)
    out = DefectHead(_cfg(kw))(x)
    ref = solidity(out.labels, out.regions)
    assert torch.equal(out.solidity.nan_to_num(-1.0), ref.nan_to_num(-1.0))
    keep = region_keep(out.regions, 2, min_solidity=0.3, solidity=ref)
    assert bool(keep.all())
    # A merged group's solidity is NaN.
    kw = dict(min_area=2, min_solidity=0.1, merge_nearby_enabled=True, merge_nearby_max_gap_px=3)
    out = DefectHead(_cfg(kw))(x)
    counts = torch.bincount(out.merged_from[:, 0], minlength=out.regions.area.shape[0])
    assert bool(torch.isnan(out.solidity[counts > 1]).all())
    assert not bool(torch.isnan(out.solidity[counts == 1]).any())


def test_merge_gap_zero_and_unmerged_ids():
    x = _maps(12)
    labels, counts = connected_components(x >= THR, 8)
    regions = region_stats(labels, counts, x)
    out = DefectHead(_cfg(dict(merge_nearby_enabled=True, merge_nearby_max_gap_px=1)))(x)
    m = merge_nearby(labels, regions, regions.area > 0, 3, 1, x)
    assert torch.equal(out.labels, m.labels)
    # Every reported region lists at least itself, sorted labels.
    for i in range(out.regions.area.shape[0]):
        ids = out.merged_from[out.merged_from[:, 0] == i, 1].tolist()
        assert int(out.regions.label[i]) in ids and ids == sorted(ids)


def test_every_toolbox_field_is_supported():
    names = {f.name for f in dataclasses.fields(DefectsConfig)}
    waiting = {"pixel_size_mm", "severity_rules"}  # not in the head yet
    assert (
        set(UNSUPPORTED_UNTIL_IMPLEMENTED) <= waiting
        and set(UNSUPPORTED_UNTIL_IMPLEMENTED) <= names
    )


# ----------------------------------------------------------------------------------------
# StaticDefectHead (the export path)
# ----------------------------------------------------------------------------------------

STATIC = dict(
    border_ignore_px=2,
    map_smoothing_method="gaussian",
    map_smoothing_ksize=5,
    hysteresis_enabled=True,
    hysteresis_low=0.5,
    open_ksize=3,
    mask_dilate_ksize=3,
    min_area=2,
    min_score_max=0.62,
    min_score_mean=0.52,
    min_fill_ratio=0.2,
    max_aspect_ratio=6.0,
    max_regions=6,
)
STATIC_CASES = [
    STATIC,
    dict(STATIC, map_smoothing_method="median", hysteresis_enabled=False, fill_holes=True),
    dict(map_smoothing_method="box", map_smoothing_ksize=3, min_score_mean=0.55, max_regions=4),
]


@pytest.mark.parametrize("kw", STATIC_CASES, ids=range(len(STATIC_CASES)))
def test_static_traced_forward_equals_dynamic_head(kw):
    x = _maps(len(str(kw)) + 5)
    head = DefectHead(_cfg(kw), static_output=True)
    want = head(x)  # eager: the dynamic head's stages, padded
    got = head._forward_static(x)  # what torch.export traces
    assert int(want.num_regions.sum()) > 0
    for name, w in want._asdict().items():
        g = getattr(got, name)
        if w.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1.2e-7, atol=0, equal_nan=True, msg=name)
        else:
            assert torch.equal(g, w), name
    dyn = DefectHead(_cfg(kw))(x)
    assert torch.equal(want.labels, dyn.labels) and torch.equal(want.num_regions, dyn.num_regions)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(min_solidity=0.5), "min_solidity=0.5"),
        (dict(merge_nearby_enabled=True, merge_nearby_max_gap_px=2), "merge_nearby_enabled=true"),
        (dict(min_score_max_quantile=0.5), "min_score_max_quantile=0.5"),
        (dict(max_regions_sort_by="area"), 'max_regions_sort_by="area"'),
    ],
)
def test_static_head_rejects_stages_it_cannot_trace(kw, name):
    with pytest.raises(ValueError, match="is not supported in exported heads") as e:
        DefectHead(_cfg(dict(kw, max_regions=3)), static_output=True)
    assert str(e.value).startswith(name)


def test_static_head_exports_with_toolbox_stages(tmp_path):
    from torchdefects.export import export_pt2, load_pt2

    head = DefectHead(_cfg(STATIC), static_output=True)
    export_pt2(head, tmp_path / "head.pt2")
    module, _ = load_pt2(tmp_path / "head.pt2")
    x = _maps(21, b=2, h=40, w=52)
    got, want = module(x), head(x)
    assert int(want.num_regions.sum()) > 0
    for name, w in want._asdict().items():
        g = got[name]
        if w.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1.2e-7, atol=0, equal_nan=True, msg=name)
        else:
            assert torch.equal(g, w), name


# ----------------------------------------------------------------------------------------
# The run: CLI flags from the config fields, records with the shape statistics
# ----------------------------------------------------------------------------------------


def test_run_records_toolbox_fields(tmp_path):
    import json

    jsonschema = pytest.importorskip("jsonschema")
    from torchdefects.batch.records import record_schema
    from torchdefects.cli import main

    x = _maps(31, b=2)
    for i in range(2):
        np.save(tmp_path / f"m{i}.npy", x[i, 0].numpy())
    out = tmp_path / "out"
    flags = ["--defect-map-smoothing", "gaussian", "--defect-map-smoothing-ksize", "3",
             "--defect-merge-nearby", "--defect-merge-nearby-max-gap-px", "3",
             "--defect-min-solidity", "0.1", "--defect-max-regions-sort-by", "area"]  # fmt: skip
    args = ["run", "--maps", str(tmp_path / "m*.npy"), "--out", str(out), "--quiet"]
    assert main([*args, "--pixel-threshold", str(THR), *flags]) == 0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    validator = jsonschema.Draft202012Validator(record_schema())
    cfg = _cfg(dict(map_smoothing_method="gaussian", map_smoothing_ksize=3, min_solidity=0.1,
                    merge_nearby_enabled=True, merge_nearby_max_gap_px=3,
                    max_regions_sort_by="area"))  # fmt: skip
    want = DefectHead(cfg)(x)
    shape = shape_stats(want.regions)
    row = 0
    for b, rec in enumerate(sorted(recs, key=lambda r: r["index"])):
        validator.validate(rec)
        regs = rec["defects"]["regions"]
        assert len(regs) == int(want.num_regions[b]) > 0
        for reg in regs:
            assert reg["id"] == int(want.regions.label[row])
            assert reg["bbox_area"] == int(shape.bbox_area[row])
            assert reg["fill_ratio"] == float(shape.fill_ratio[row])
            assert reg["aspect_ratio"] == float(shape.aspect_ratio[row])
            sol = float(want.solidity[row])
            assert reg["solidity"] == (None if sol != sol else sol)
            ids = want.merged_from[want.merged_from[:, 0] == row, 1].tolist()
            assert reg["merged_from_ids"] == ids and reg["id"] == ids[0]
            row += 1
    assert any(len(r["merged_from_ids"]) > 1 for rec in recs for r in rec["defects"]["regions"])


def test_extract_defects_passes_the_toolbox_options():
    from torchdefects.extract import extract_defects

    x = _maps(41, b=1)
    kw = dict(map_smoothing_method="box", map_smoothing_ksize=3, min_solidity=0.1,
              merge_nearby_enabled=True, merge_nearby_max_gap_px=3)  # fmt: skip
    got = extract_defects(x[0, 0].numpy(), pixel_threshold=THR, **kw)
    want = DefectHead(_cfg(kw))(x)
    assert [r["id"] for r in got["regions"]] == want.regions.label.tolist()
    for i, r in enumerate(got["regions"]):
        sol = float(want.solidity[i])
        assert r["solidity"] == (None if sol != sol else sol)
        assert r["merged_from_ids"] == want.merged_from[want.merged_from[:, 0] == i, 1].tolist()
