"""anomalib itself, end to end (runs where anomalib is installed; see docs/anomalib.md).

anomalib pulls a newer torch and torchvision than the CI's CPU pin, so it is in no extra:
this module skips where it is not importable. The same flows run in CI on a stand-in with
anomalib's output structure (tests/test_attach.py).
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import torchdefects as td
from torchdefects.demo import make_surface

pytest.importorskip("anomalib")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from anomalib.models import Padim  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "anomalib.md"


def _parts(rng, n, size=64):
    gray = torch.from_numpy(np.stack([make_surface(rng, size) for _ in range(n)])).float()
    return gray[:, None].repeat(1, 3, 1, 1)


@pytest.fixture(scope="module")
def padim():
    rng = np.random.default_rng(0)
    model = Padim(
        backbone="resnet18",
        pre_trained=False,
        layers=["layer1", "layer2"],
        pre_processor=False,
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    detector = model.model
    detector.train()
    with torch.no_grad():
        detector(_parts(rng, 16))
    detector.fit()
    detector.eval()
    return model, detector, _parts(rng, 3)


def _config(detector, images):
    cal = td.PixelThresholdCalibrator(q=0.99)
    with torch.inference_mode():
        cal.update(detector(images).anomaly_map)
    thr, prov = cal.compute()
    return td.DefectsConfig(
        pixel_threshold=thr, pixel_threshold_provenance=prov, min_area=2, max_regions=8
    )


def test_attach_inference_batch(padim):
    _, detector, images = padim
    cfg = _config(detector, images)
    with torch.inference_mode():
        out = td.attach(detector, td.DefectHead(cfg))(images)
        ref = detector(images)
        expected = td.DefectHead(cfg)(ref.anomaly_map, None, ref.pred_score.reshape(-1))
    assert torch.equal(out.mask, expected.mask)
    assert torch.equal(out.image_score, ref.pred_score.reshape(-1).float())
    assert out.num_regions.sum() > 0


def test_onnx_join_matches_eager(padim, tmp_path):
    from torchdefects.export import export_onnx
    from torchdefects.onnx_detector import join_onnx

    model, detector, images = padim
    cfg = _config(detector, images)
    det_path = model.to_onnx(tmp_path / "exported", input_size=(64, 64))
    head_path = tmp_path / "head.onnx"
    export_onnx(cfg, head_path, image_score_input=True)
    joined = join_onnx(det_path, head_path, map_output="anomaly_map")
    sess = ort.InferenceSession(joined.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"input": images.numpy()})))
    with torch.inference_mode():
        ref = td.attach(detector, td.DefectHead(cfg, static_output=True))(images)
    assert {"pred_score", "anomaly_map", "mask", "num_regions", "boxes"} <= set(names)
    # The ONNX detector's map rounds differently from eager: compare where both agree on
    # the map, and the head's outputs on the ONNX map itself.
    onnx_map = torch.from_numpy(got["anomaly_map"])
    with torch.inference_mode():
        on_onnx_map = td.DefectHead(cfg, static_output=True)(
            onnx_map, None, torch.from_numpy(got["pred_score"]).reshape(-1)
        )
    assert np.array_equal(got["mask"].astype(bool), on_onnx_map.mask.numpy())
    assert np.array_equal(got["num_regions"], on_onnx_map.num_regions.numpy())
    assert np.array_equal(got["boxes"], on_onnx_map.boxes.numpy())
    torch.testing.assert_close(onnx_map, ref_map := detector(images).anomaly_map.detach())
    assert ref_map.shape == onnx_map.shape and ref.mask.shape == on_onnx_map.mask.shape


def test_doc_blocks_run(tmp_path, monkeypatch):
    """docs/anomalib.md's python blocks, in order, in one namespace."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert (tmp_path / "padim_defects.onnx").is_file()
    assert (tmp_path / "padim_defects.pt2").is_file()
