"""torchdefects.batch.run_folder: end to end on temp folders, against DefectHead called directly.

Floats in records are the shortest text that reads back to the same float32; the oracle
here is NumPy's own shortest repr of a float32 (``str(np.float32(v))``).
"""

import dataclasses
import json
import os
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

from torchdefects import files as tdio
from torchdefects.batch import RunOptions, RunUsageError
from torchdefects.batch import run_folder as run
from torchdefects.config import DefectsConfig
from torchdefects.geometry import ImageSpace

CFG = DefectsConfig(
    pixel_threshold=0.6, open_ksize=3, close_ksize=0, fill_holes=True, min_area=2, connectivity=8
)


def _schema():
    text = resources.files("torchdefects").joinpath("record_schema.json").read_text()
    return json.loads(text)


def _validator(kind="record"):
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema()
    if kind == "region_line":
        schema = {**schema, "oneOf": [{"$ref": "#/$defs/region_line"}]}
    return jsonschema.Draft202012Validator(schema)


def _blob_map(rng, h, w, n_blobs=3):
    """Smooth-ish noise below 0.5 with bright blobs, some ring-shaped (holes to fill)."""
    a = (rng.random((h, w)) * 0.5).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for k in range(n_blobs):
        cy, cx = rng.integers(3, h - 3), rng.integers(3, w - 3)
        r = rng.integers(2, 5)
        d = np.hypot(yy - cy, xx - cx)
        blob = d <= r
        if k % 2:
            blob &= d >= r - 1.2  # ring
        a[blob] = 0.7 + 0.3 * rng.random(int(blob.sum()))
    return a


def _blob_maps(d, seed, sizes, n_blobs=3):
    """``{name: map}`` of :func:`_blob_map` maps of ``sizes``, saved as ``d/m{i}.npy``."""
    rng = np.random.default_rng(seed)
    d.mkdir()
    maps = {}
    for i, (h, w) in enumerate(sizes):
        maps[f"m{i}.npy"] = _blob_map(rng, h, w, n_blobs)
        np.save(d / f"m{i}.npy", maps[f"m{i}.npy"])
    return maps


def _records(out):
    return tdio.read_jsonl(os.path.join(out, "results.jsonl")).records


def _f32(v):
    return float(str(np.float32(v)))


def _expected(cfg, a):
    """Regions and mask of one map from the head itself."""
    from torchdefects.head import DefectHead
    from torchdefects.shape import shape_stats

    d = DefectHead(cfg)(torch.from_numpy(a)[None, None])
    r = d.regions
    shape = shape_stats(r)
    regions = [
        {
            "id": int(r.label[j]),
            "bbox_xyxy": [int(v) for v in r.bbox_xyxy[j].tolist()],
            "area": int(r.area[j]),
            "centroid_xy": [_f32(v) for v in r.centroid_xy[j].tolist()],
            "score_max": _f32(r.score_max[j]),
            "score_mean": _f32(r.score_mean[j]),
            "bbox_area": int(shape.bbox_area[j]),
            "fill_ratio": float(shape.fill_ratio[j]),
            "aspect_ratio": float(shape.aspect_ratio[j]),
            "solidity": None,
        }
        for j in range(r.label.shape[0])
    ]
    return regions, d.mask[0, 0].numpy(), _f32(d.roi_max[0]), _f32(d.roi_mean[0])


def _read_mask(out, mask):
    return tdio.read_mask(os.path.join(out, mask["path"]))


def _write_formats(d, rng):
    """The same kinds of maps in every format the runner reads; returns path -> array."""
    os.makedirs(d, exist_ok=True)
    maps = {}
    a = _blob_map(rng, 20, 24)
    np.save(os.path.join(d, "a.npy"), a)
    maps["a.npy"] = a
    b = _blob_map(rng, 20, 24)
    np.savez(os.path.join(d, "b.npz"), anomaly_map=b[None])
    maps["b.npz"] = b
    c = _blob_map(rng, 16, 16)
    torch.save(torch.from_numpy(c)[None, None], os.path.join(d, "c.pt"))
    maps["c.pt"] = c
    e8 = np.round(_blob_map(rng, 18, 22) * 255).astype(np.uint8)
    Image.fromarray(e8, mode="L").save(os.path.join(d, "e8.png"))
    maps["e8.png"] = e8.astype(np.float32)
    e16 = np.round(_blob_map(rng, 18, 22) * 65535).astype(np.uint16)
    Image.fromarray(e16).save(os.path.join(d, "e16.png"))
    maps["e16.png"] = e16.astype(np.float32)
    f = _blob_map(rng, 20, 24)
    Image.fromarray(f, mode="F").save(os.path.join(d, "f.tif"))
    maps["f.tif"] = f
    return maps


def test_every_format_equals_head(tmp_path):
    rng = np.random.default_rng(0)
    maps = _write_formats(str(tmp_path / "maps"), rng)
    # One threshold per value range would need a config per file; scale 8/16-bit maps back.
    for name in ("e8.png", "e16.png"):
        os.remove(tmp_path / "maps" / name)
    del maps["e8.png"], maps["e16.png"]
    out = str(tmp_path / "out")
    summary = run(
        RunOptions(
            out=out,
            maps=str(tmp_path / "maps"),
            pixel_threshold=0.6,
            overrides={"open_ksize": 3, "fill_holes": True, "min_area": 2},
            save_masks="npy",
            batch_size=3,
            quiet=True,
        )
    )
    assert summary.exit_code == 0
    recs = _records(out)
    assert [os.path.basename(r["input"]) for r in recs] == sorted(maps)
    v = _validator()
    n_regions = 0
    for rec in recs:
        v.validate(rec)
        a = maps[os.path.basename(rec["input"])]
        regions, mask, rmax, rmean = _expected(CFG, a)
        d = rec["defects"]
        assert d["regions"] == regions
        n_regions += len(regions)
        assert rec["anomaly_map"]["shape"] == list(a.shape)
        assert rec["image_size"] is None
        assert d["pixel_threshold"] == 0.6
        assert d["pixel_threshold_provenance"]["source"] == "explicit"
        assert d["map_stats_roi"] == {"max": rmax, "mean": rmean}
        assert d["mask"]["encoding"] == "npy_uint8_0_255"
        np.testing.assert_array_equal(_read_mask(out, d["mask"]), mask)
    assert n_regions > 0  # the comparison saw real regions


def test_integer_png_maps_keep_raw_values(tmp_path):
    rng = np.random.default_rng(1)
    maps = _write_formats(str(tmp_path / "maps"), rng)
    out = str(tmp_path / "out")
    run(
        RunOptions(
            out=out,
            maps=str(tmp_path / "maps" / "e16.png"),
            pixel_threshold=0.6 * 65535,
            quiet=True,
        )
    )
    (rec,) = _records(out)
    cfg = dataclasses.replace(DefectsConfig(), pixel_threshold=0.6 * 65535)
    assert rec["defects"]["regions"] == _expected(cfg, maps["e16.png"])[0]
    assert rec["defects"]["regions"]


@pytest.mark.parametrize("fmt", ["png", "npy", "npz"])
def test_mixed_sizes_masks_and_regions_jsonl(tmp_path, fmt):
    d = tmp_path / "maps"
    maps = _blob_maps(d, 2, [(16, 16), (20, 12), (16, 16), (9, 30), (20, 12)], n_blobs=2)
    out = str(tmp_path / "out")
    run(
        RunOptions(
            out=out,
            maps=str(d),
            pixel_threshold=0.6,
            overrides={"open_ksize": 3, "fill_holes": True, "min_area": 2},
            save_masks=fmt,
            regions_jsonl=True,
            batch_size=5,
            quiet=True,
        )
    )
    recs = _records(out)
    lines = tdio.read_jsonl(os.path.join(out, "regions.jsonl")).records
    rv = _validator("region_line")
    expected_lines = []
    for rec in recs:
        a = maps[os.path.basename(rec["input"])]
        regions, mask, _, _ = _expected(CFG, a)
        assert rec["defects"]["regions"] == regions
        assert rec["defects"]["mask"]["encoding"] == tdio.MASK_ENCODINGS[fmt]
        assert rec["defects"]["mask"]["path"].endswith(tdio.MASK_EXTENSIONS[fmt])
        np.testing.assert_array_equal(_read_mask(out, rec["defects"]["mask"]), mask)
        expected_lines += [{"index": rec["index"], "input": rec["input"], **r} for r in regions]
    assert lines == expected_lines
    for line in lines:
        rv.validate(line)


def _bad_inputs(d):
    np.save(d / "good0.npy", np.full((8, 8), 0.9, np.float32))
    np.save(d / "good1.npy", np.zeros((8, 8), np.float32))
    (d / "unreadable.npy").write_bytes(b"this is not a numpy file")
    np.save(d / "wrong_shape.npy", np.zeros((2, 8, 8), np.float32))
    nan = np.zeros((8, 8), np.float32)
    nan[3, 3] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "zero_size.npy", np.zeros((0, 8), np.float32))
    return {
        "unreadable.npy": "unreadable",
        "wrong_shape.npy": "bad_shape",
        "nan.npy": "nan_map",
        "zero_size.npy": "empty_map",
    }


@pytest.mark.parametrize("num_workers", [0, 2])
def test_error_records_rest_processed(tmp_path, num_workers):
    d = tmp_path / "maps"
    d.mkdir()
    bad = _bad_inputs(d)
    out = str(tmp_path / "out")
    s = run(
        RunOptions(
            out=out,
            maps=str(d),
            pixel_threshold=0.5,
            save_masks="png",
            save_overlays=True,
            batch_size=2,
            num_workers=num_workers,
            quiet=True,
        )
    )
    assert s.exit_code == 3
    assert s.errors == 4
    recs = _records(out)
    assert len(recs) == 6
    v = _validator()
    for rec in recs:
        v.validate(rec)
        name = os.path.basename(rec["input"])
        if name in bad:
            assert rec["error"]["type"] == bad[name]
            assert name in rec["error"]["message"]
        else:
            assert "defects" in rec
            assert os.path.isfile(os.path.join(out, rec["defects"]["mask"]["path"]))
    by_name = {os.path.basename(r["input"]): r for r in recs}
    assert len(by_name["good0.npy"]["defects"]["regions"]) == 1
    assert by_name["good1.npy"]["defects"]["regions"] == []


def test_name_collisions_stay_inside_out(tmp_path):
    d = tmp_path / "maps"
    for sub in ("a", "b", "c d"):
        (d / sub).mkdir(parents=True)
    a = np.full((6, 6), 0.9, np.float32)
    for p in ("a/img.npy", "b/img.npy", "img.npy", "c d/img.npy"):
        np.save(d / p, a)
    np.savez(d / "img.npz", map=a)
    out = str(tmp_path / "out")
    run(
        RunOptions(
            out=out,
            maps=str(d),
            pixel_threshold=0.5,
            save_masks="png",
            save_overlays=True,
            quiet=True,
        )
    )
    recs = _records(out)
    assert len(recs) == 5
    paths = [r["defects"]["mask"]["path"] for r in recs]
    assert len(set(paths)) == 5
    real_out = os.path.realpath(out)
    for p in paths:
        full = os.path.realpath(os.path.join(out, p))
        assert full.startswith(real_out + os.sep)
        assert os.path.isfile(full)
    overlays = [
        os.path.join(root, f)
        for root, _, files in os.walk(os.path.join(out, "overlays"))
        for f in files
    ]
    assert len(overlays) == 5


def test_resume_after_torn_line(tmp_path):
    d = tmp_path / "maps"
    d.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        np.save(d / f"m{i}.npy", _blob_map(rng, 12, 12, 1))
    out = str(tmp_path / "out")
    opts = RunOptions(out=out, maps=str(d), pixel_threshold=0.6, regions_jsonl=True, quiet=True)
    run(opts)
    results = tmp_path / "out" / "results.jsonl"
    full = results.read_bytes()
    lines = full.split(b"\n")
    # As if killed while writing line 4: 3 complete lines and half of the 4th.
    torn = b"\n".join(lines[:3]) + b"\n" + lines[3][: len(lines[3]) // 2]
    results.write_bytes(torn)
    with pytest.raises(RunUsageError, match="--resume"):
        run(opts)
    s = run(dataclasses.replace(opts, resume=True))
    assert s.skipped == 3 and s.processed == 3 and s.exit_code == 0
    assert results.read_bytes() == full
    regions = tdio.read_jsonl(os.path.join(out, "regions.jsonl")).records
    per_input = {}
    for r in regions:
        per_input[r["input"]] = per_input.get(r["input"], 0) + 1
    for rec in tdio.read_jsonl(os.path.join(out, "results.jsonl")).records:
        assert per_input.get(rec["input"], 0) == len(rec["defects"]["regions"])


def test_resume_sweeps_temp_files_of_killed_writes(tmp_path):
    d = tmp_path / "maps"
    d.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        np.save(d / f"m{i}.npy", _blob_map(rng, 12, 12, 1))
    out = tmp_path / "out"
    opts = RunOptions(out=str(out), maps=str(d), pixel_threshold=0.6, save_masks="png", quiet=True)
    run(opts)
    # What a kill between the temp write and the rename leaves behind.
    orphan = out / "masks" / ".m1.npy.png.k3j2x9.tmp"
    orphan.write_bytes(b"partial")
    keep = out / "masks" / "notes.tmp"
    keep.write_bytes(b"not ours")
    s = run(dataclasses.replace(opts, resume=True))
    assert s.skipped == 3 and s.exit_code == 0
    assert not orphan.exists() and keep.exists()


def test_image_space_resize(tmp_path):
    rng = np.random.default_rng(4)
    a = _blob_map(rng, 12, 16, 3)
    np.save(tmp_path / "m.npy", a)
    out = str(tmp_path / "out")
    run(
        RunOptions(
            out=out,
            maps=str(tmp_path / "m.npy"),
            pixel_threshold=0.6,
            image_size=(36, 32),
            mask_space="image",
            save_masks="png",
            quiet=True,
        )
    )
    (rec,) = _records(out)
    _validator().validate(rec)
    regions, mask, _, _ = _expected(DefectsConfig(pixel_threshold=0.6), a)
    assert regions
    assert rec["image_size"] == [36, 32]
    d = rec["defects"]
    assert d["space"]["to_image"] == {"method": "resize", "image_size": [36, 32]}
    # Integer factors (3 rows, 2 columns): every map pixel is a 3x2 block of the image.
    np.testing.assert_array_equal(_read_mask(out, d["mask"]), np.kron(mask, np.ones((3, 2), bool)))
    assert d["mask"]["space"] == "image" and d["mask"]["shape"] == [36, 32]
    for got, want in zip(d["regions"], regions):
        x1, y1, x2, y2 = want["bbox_xyxy"]
        assert got["bbox_xyxy"] == want["bbox_xyxy"]
        assert got["bbox_xyxy_image"] == [2 * x1, 3 * y1, 2 * x2 + 1, 3 * y2 + 2]


class _Det(torch.nn.Module):
    """A small real conv detector returning a dict (map under "anomaly_map") and extras."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x: torch.Tensor):
        m = torch.sigmoid(self.conv(x) * 4.0)
        return {"anomaly_map": m, "score": m.amax(dim=(1, 2, 3))}


def test_images_with_detector_equal_head(tmp_path):
    from torchdefects.head import DefectHead

    rng = np.random.default_rng(5)
    d = tmp_path / "imgs"
    d.mkdir()
    sizes = [(30, 40), (24, 24), (30, 40)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"i{i}.png")
    det = torch.jit.script(_Det())
    det_path = str(tmp_path / "det.pt")
    det.save(det_path)
    out = str(tmp_path / "out")
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    s = run(
        RunOptions(
            out=out,
            images=str(d),
            detector=det_path,
            map_output="anomaly_map",
            input_size=(16, 20),
            mean=mean,
            std=std,
            pixel_threshold=0.6,
            save_masks="png",
            mask_space="image",
            save_overlays=True,
            quiet=True,
        )
    )
    assert s.exit_code == 0
    recs = _records(out)
    head = DefectHead(DefectsConfig(pixel_threshold=0.6))
    total = 0
    for rec, (h, w) in zip(recs, sizes):
        _validator().validate(rec)
        img = np.asarray(Image.open(rec["input"]).convert("RGB").resize((20, 16), Image.BILINEAR))
        x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
        x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        with torch.no_grad():
            want = head(det(x[None])["anomaly_map"])
        assert rec["image_size"] == [h, w]
        assert rec["anomaly_map"]["shape"] == [16, 20]
        got = rec["defects"]["regions"]
        assert [r["bbox_xyxy"] for r in got] == want.regions.bbox_xyxy.tolist()
        assert [r["area"] for r in got] == want.regions.area.tolist()
        total += len(got)
        sp = ImageSpace.make((16, 20), (h, w), False)
        np.testing.assert_array_equal(
            _read_mask(out, rec["defects"]["mask"]), sp.mask_to_image(want.mask[0, 0].numpy())
        )
        ov = os.path.join(out, "overlays", os.path.basename(rec["input"]) + ".png")
        with Image.open(ov) as im:
            assert im.mode == "RGB" and im.width >= w and im.height >= h  # picture + banner
    assert total > 0


def test_usage_errors(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((4, 4), np.float32))
    out = str(tmp_path / "out")
    with pytest.raises(RunUsageError, match="pixel threshold"):
        run(RunOptions(out=out, maps=str(tmp_path), quiet=True))
    with pytest.raises(RunUsageError, match="exactly one of --maps or --images"):
        run(RunOptions(out=out, pixel_threshold=1.0, quiet=True))
    with pytest.raises(RunUsageError, match="--images needs --detector"):
        run(RunOptions(out=out, images=str(tmp_path), pixel_threshold=1.0, quiet=True))
    with pytest.raises(RunUsageError, match="--mask-space image needs"):
        run(RunOptions(out=out, maps=str(tmp_path), pixel_threshold=1, mask_space="image"))
    with pytest.raises(RunUsageError, match="open_ksize"):
        run(RunOptions(out=out, maps=str(tmp_path), pixel_threshold=1, overrides={"open_ksize": 4}))
    with pytest.raises(RunUsageError, match="no files matching"):
        run(RunOptions(out=out, maps=str(tmp_path / "*.npz"), pixel_threshold=1.0, quiet=True))


def test_run_on_device_equals_head_on_cpu(tmp_path, device):
    d = tmp_path / "maps"
    maps = _blob_maps(d, 6, [(20, 24), (20, 24), (12, 30), (20, 24), (12, 30)])
    out = str(tmp_path / "out")
    s = run(
        RunOptions(
            out=out,
            maps=str(d),
            pixel_threshold=0.6,
            overrides={"open_ksize": 3, "fill_holes": True, "min_area": 2},
            save_masks="npz",
            device=device,
            batch_size=4,
            num_workers=1,
            quiet=True,
        )
    )
    assert s.exit_code == 0
    for rec in _records(out):
        regions, mask, _, _ = _expected(CFG, maps[os.path.basename(rec["input"])])
        got = rec["defects"]["regions"]
        assert [(r["id"], r["bbox_xyxy"], r["area"]) for r in got] == [
            (r["id"], r["bbox_xyxy"], r["area"]) for r in regions
        ]
        for g, r in zip(got, regions):
            assert g["score_max"] == r["score_max"]
            assert g["score_mean"] == pytest.approx(r["score_mean"], rel=1e-6)
            assert g["centroid_xy"] == pytest.approx(r["centroid_xy"], rel=1e-6)
        np.testing.assert_array_equal(_read_mask(out, rec["defects"]["mask"]), mask)
