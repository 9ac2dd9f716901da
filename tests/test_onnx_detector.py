"""ONNX detectors: joined with the head into one file, and run by `torchdefects run`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import torchdefects as td
from torchdefects.cli import main
from torchdefects.onnx_detector import OnnxDetector, join_onnx

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

CFG = {"pixel_threshold": 0.55, "open_ksize": 3, "min_area": 2, "max_regions": 6}


class AnomalibLikeOnnx(nn.Module):
    """What anomalib's to_onnx exports: input `input`, outputs pred_score (B, 1), anomaly_map."""

    def forward(self, x):
        m = torch.sigmoid((x.mean(1, keepdim=True) - 0.5) * 6)
        return {"pred_score": m.amax((1, 2, 3))[:, None], "anomaly_map": m}


@pytest.fixture(scope="module")
def detector_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "model.onnx"
    b, h, w = (torch.export.Dim(n, min=2) for n in ("batch", "h", "w"))
    torch.onnx.export(
        AnomalibLikeOnnx(),
        (torch.rand(2, 3, 16, 16),),
        str(path),
        input_names=["input"],
        output_names=["pred_score", "anomaly_map"],
        dynamo=True,
        dynamic_shapes=({0: b, 2: h, 3: w},),
    )
    return path


def _images(rng, n=3, h=20, w=18):
    return torch.from_numpy(rng.random((n, 3, h, w)).astype(np.float32))


def test_export_joins_head_onto_onnx_detector(detector_onnx, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"defects": CFG}))
    full = tmp_path / "full.onnx"
    assert main(["export", "--config", str(cfg), "--detector", str(detector_onnx),
                 "--map-output", "anomaly_map", "-o", str(full)]) == 0  # fmt: skip
    model = onnx.load(str(full))
    outputs = [o.name for o in model.graph.output]
    assert outputs[:2] == ["pred_score", "anomaly_map"]  # the detector's, kept
    assert {"mask", "num_regions", "boxes", "score_max", "image_score", "image_label"} <= set(
        outputs
    )
    assert [i.name for i in model.graph.input] == ["input"]
    assert json.loads(dict((p.key, p.value) for p in model.metadata_props)[
        "defects_config.json"])["pixel_threshold"] == CFG["pixel_threshold"]  # fmt: skip
    sess = ort.InferenceSession(str(full), providers=["CPUExecutionProvider"])
    x = _images(np.random.default_rng(0))
    got = dict(zip(outputs, sess.run(None, {"input": x.numpy()})))
    # The head on the ONNX detector's own map and score (eager torch), field by field.
    amap = torch.from_numpy(got["anomaly_map"])
    want = td.DefectHead(td.DefectsConfig(**CFG), static_output=True)(
        amap, None, torch.from_numpy(got["pred_score"]).reshape(-1)
    )
    assert np.array_equal(got["mask"].astype(bool), want.mask.numpy())
    for name in ("num_regions", "boxes", "area", "image_label"):
        assert np.array_equal(got[name], getattr(want, name).numpy()), name
    for name in ("score_max", "score_mean", "centroid", "image_score"):
        np.testing.assert_allclose(got[name], getattr(want, name).numpy(), rtol=1e-6, atol=0)
    assert np.array_equal(got["image_score"], got["pred_score"].reshape(-1))


def test_join_errors(detector_onnx, tmp_path):
    head = tmp_path / "head.onnx"
    td.export_onnx(td.DefectsConfig(**CFG), head)
    with pytest.raises(ValueError, match=r"map_output='heat' is not an output.*pred_score"):
        join_onnx(detector_onnx, head, map_output="heat")
    with pytest.raises(ValueError, match="takes no image_score input"):
        join_onnx(detector_onnx, head, score_output="pred_score")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"defects": CFG}))
    assert main(["export", "--config", str(cfg), "--detector", str(detector_onnx),
                 "-o", str(tmp_path / "x.pt2")]) == 2  # fmt: skip


def test_run_with_onnx_detector(detector_onnx, tmp_path):
    rng = np.random.default_rng(1)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    out = tmp_path / "out"
    args = ["run", "--images", str(imgs), "--detector", str(detector_onnx), "--map-output",
            "anomaly_map", "--out", str(out), "--quiet", "--pixel-threshold", "0.55"]  # fmt: skip
    assert main(args) == 0
    det = OnnxDetector(detector_onnx)
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 3
    for r in recs:
        u8 = np.asarray(Image.open(r["input"])).copy()
        x = torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255.0
        o = det(x)
        d = td.DefectHead(td.DefectsConfig(pixel_threshold=0.55))(
            o["anomaly_map"], None, o["pred_score"].reshape(-1)
        )
        assert r["score_source"] == "detector"
        assert [g["bbox_xyxy"] for g in r["defects"]["regions"]] == d.regions.bbox_xyxy.tolist()


def test_calibrate_with_onnx_detector(detector_onnx, tmp_path):
    """calibrate --images --detector model.onnx: numpy.quantile of the ONNX detector's maps."""
    rng = np.random.default_rng(2)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    maps = []
    det = OnnxDetector(detector_onnx)
    for i in range(3):
        u8 = rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)
        Image.fromarray(u8).save(imgs / f"{i}.png")
        x = torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255.0
        maps.append(det(x)["anomaly_map"].numpy().ravel())
    out = tmp_path / "cfg.json"
    args = ["calibrate", "--images", str(imgs), "--detector", str(detector_onnx),
            "--map-output", "anomaly_map", "--q", "0.9", "-o", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    got = json.loads(out.read_text())["defects"]["pixel_threshold"]
    want = float(np.quantile(np.concatenate(maps).astype(np.float64), 0.9))
    assert got == want
