import json
import os
import subprocess
import sys
import textwrap
from typing import Dict, Tuple

import pytest
import torch
from torch import Tensor, nn

from torchdefects.config import DefectsConfig
from torchdefects.export import (
    EXTRA_FILES,
    _format_for,
    attach,
    export_from_config,
    export_onnx,
    export_pt2,
    load_pt2,
    load_scripted,
    onnx_metadata,
    save_scripted,
)
from torchdefects.head import DefectHead, Defects, StaticDefects
from torchdefects.morphology import closing, opening
from torchdefects.roi import roi_stats
from torchdefects.threshold import binarize

CFG = dict(
    pixel_threshold=0.6,
    roi_xyxy_norm=[0.05, 0.1, 0.95, 0.9],
    open_ksize=3,
    close_ksize=3,
    fill_holes=True,
    min_area=4,
    max_regions=5,
)


def flat(out):
    """Defects -> list of tensors (regions expanded), for comparisons across processes."""
    tensors = []
    for x in out:
        if isinstance(x, tuple):
            tensors.extend(x)
        elif x is not None:  # Defects' optional toolbox outputs are None by default
            tensors.append(x)
    return tensors


def assert_same(a, b):
    fa, fb = flat(a), flat(b)
    # Regions expand to 7 tensors; the 4 optional outputs (solidity, merged_from, severity,
    # image_severity) are None with these configs.
    assert len(fa) == len(fb) == len(Defects._fields) - 1 + 7 - 4
    for x, y in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.nan_to_num(), y.nan_to_num())


class ConvDetector(nn.Module):
    """A small real detector: conv features, a 1-channel sigmoid map; returns three ways."""

    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1)
        )
        # Random weights plus a local-brightness path, so bright patches score high.
        with torch.no_grad():
            self.features[0].weight.mul_(0.1).add_(1.0 / 27)
            self.features[0].bias.zero_()
            self.features[2].weight.mul_(0.1).add_(0.5 / 9)
            self.features[2].bias.fill_(-6.0)

    def forward(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self.features(images))


class TupleDetector(ConvDetector):
    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        feats = self.features(images)
        return feats, torch.sigmoid(feats)


class DictDetector(ConvDetector):
    def forward(self, images: Tensor) -> Dict[str, Tensor]:  # type: ignore[override]
        feats = self.features(images)
        return {"features": feats, "anomaly_map": torch.sigmoid(feats)}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 40, 44, generator=g)
    x[:, :, 10:20, 12:25] += 2.0  # a bright defect
    return x


def test_save_load_roundtrip(tmp_path, images):
    head = DefectHead(DefectsConfig(**CFG))
    path = tmp_path / "head.pt"
    scripted = save_scripted(head, path)
    assert isinstance(scripted, torch.jit.ScriptModule)
    module, meta = load_scripted(path)
    assert meta["config"] == head.config.to_dict()
    assert meta["provenance"] == {"source": "config"}
    assert meta["meta"]["format"] == 1 and meta["meta"]["torch"] == torch.__version__
    maps = torch.rand(2, 1, 30, 33)
    assert_same(module(maps), head(maps))
    assert_same(module(maps, torch.tensor([0.2, 0.9])), head(maps, torch.tensor([0.2, 0.9])))
    # the scripted module carries the config too, and save_scripted finds it there
    assert json.loads(module.config_json) == head.config.to_dict()
    save_scripted(module, tmp_path / "again.pt")
    assert load_scripted(tmp_path / "again.pt")[1]["config"] == meta["config"]


def test_extra_files_readable_with_plain_torch(tmp_path):
    head = DefectHead(DefectsConfig(**CFG))
    prov = {"source": "calibration", "method": "quantile", "q": 0.999, "num_maps": 12}
    save_scripted(head, tmp_path / "h.pt", provenance=prov)
    extra = {name: "" for name in EXTRA_FILES.values()}
    torch.jit.load(str(tmp_path / "h.pt"), _extra_files=extra)
    assert json.loads(extra["defects_config.json"])["pixel_threshold"] == 0.6
    assert json.loads(extra["threshold_provenance.json"]) == prov
    # the config's own provenance is the default; no threshold -> null provenance
    cfg = DefectsConfig(pixel_threshold=0.5, pixel_threshold_provenance={"source": "explicit"})
    save_scripted(DefectHead(cfg), tmp_path / "p.pt")
    assert load_scripted(tmp_path / "p.pt")[1]["provenance"] == {"source": "explicit"}
    save_scripted(DefectHead(DefectsConfig()), tmp_path / "n.pt")
    assert load_scripted(tmp_path / "n.pt")[1]["provenance"] is None
    # a plain TorchScript file loads with empty metadata
    torch.jit.save(torch.jit.script(nn.ReLU()), str(tmp_path / "plain.pt"))
    assert load_scripted(tmp_path / "plain.pt")[1] == {
        "config": None,
        "provenance": None,
        "meta": None,
    }


def test_save_exceptions(tmp_path):
    head = DefectHead(DefectsConfig(**CFG))
    with pytest.raises(ValueError, match=r"provenance\.source must be one of"):
        save_scripted(head, tmp_path / "x.pt", provenance={"source": "guess"})
    with pytest.raises(TypeError, match="provenance must be a JSON object or null"):
        save_scripted(head, tmp_path / "x.pt", provenance=[1])
    with pytest.raises(ValueError, match="config must be given: module holds no DefectHead"):
        save_scripted(nn.ReLU(), tmp_path / "x.pt")
    with pytest.raises(TypeError, match="config must be a DefectsConfig, a dict or None"):
        save_scripted(head, tmp_path / "x.pt", config=3)
    with pytest.raises(ValueError, match="open_ksize must be 0 or an odd integer"):
        save_scripted(head, tmp_path / "x.pt", config={"open_ksize": 2})
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "detector_cls, output",
    [(ConvDetector, None), (TupleDetector, 1), (DictDetector, "anomaly_map")],
)
@pytest.mark.parametrize("script_detector", [False, True])
def test_attach(detector_cls, output, script_detector, images, tmp_path):
    detector = detector_cls().eval()
    head = DefectHead(DefectsConfig(**CFG))
    raw = detector(images)
    anomaly_map = raw if output is None else raw[output]
    expected = head(anomaly_map)
    assert expected.num_regions.sum() > 0  # the test exercises real regions
    if script_detector:
        detector = torch.jit.script(detector)
    model = attach(detector, head, output=output)
    assert_same(model(images), expected)
    scripted = torch.jit.script(model)
    assert_same(scripted(images), expected)
    thr = torch.tensor([0.55, 0.7, 0.65])
    assert_same(scripted(images, thr), head(anomaly_map, thr))
    save_scripted(model, tmp_path / "m.pt")
    loaded, meta = load_scripted(tmp_path / "m.pt")
    assert meta["config"] == head.config.to_dict()
    assert_same(loaded(images), expected)


def test_attach_exceptions(images):
    head = DefectHead(DefectsConfig(**CFG))
    with pytest.raises(TypeError, match="detector returned tuple, not a tensor"):
        attach(TupleDetector(), head)(images)
    with pytest.raises(TypeError, match="detector returned Tensor, not a tuple or list"):
        attach(ConvDetector(), head, output=0)(images)
    with pytest.raises(TypeError, match="detector returned a tensor, not a dict"):
        attach(ConvDetector(), head, output="map")(images)
    with pytest.raises(KeyError, match="has no field 'map'"):
        attach(DictDetector(), head, output="map")(images)
    with pytest.raises(TypeError, match=r"output must be None, an int or a str, got 1\.5"):
        attach(ConvDetector(), head, output=1.5)
    with pytest.raises(TypeError, match=r"detector must be an nn\.Module"):
        attach(lambda x: x, head)
    # scripted: a tensor-returning detector with an index is refused at run time
    with pytest.raises(torch.jit.Error, match="detector returned a tensor"):
        torch.jit.script(attach(ConvDetector(), head, output=0))(images)


SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    try:
        import torchdefects  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torchdefects is importable in the subprocess")
    import torch
    results = {}
    for name in ["head.pt", "model.pt"]:
        extra = {"defects_config.json": "", "threshold_provenance.json": ""}
        module = torch.jit.load(name, _extra_files=extra)
        inputs = torch.load(name + ".in")
        out = module(*inputs)
        flat = []
        for x in out:
            flat.extend(x) if isinstance(x, tuple) else flat.append(x)
        results[name] = flat
        results[name + ".config"] = json.loads(extra["defects_config.json"])
        results[name + ".provenance"] = json.loads(extra["threshold_provenance.json"])
    torch.save(results, "results.pt")
    """
)


def test_loaded_without_torchdefects(tmp_path, images):
    head = DefectHead(DefectsConfig(**CFG))
    model = attach(DictDetector().eval(), DefectHead(DefectsConfig(**CFG)), output="anomaly_map")
    maps = torch.rand(3, 1, 36, 38)
    thr = torch.tensor([0.5, 0.7, 0.6])
    save_scripted(head, tmp_path / "head.pt")
    save_scripted(model, tmp_path / "model.pt", provenance={"source": "explicit"})
    torch.save((maps, thr), tmp_path / "head.pt.in")
    torch.save((images,), tmp_path / "model.pt.in")
    (tmp_path / "check.py").write_text(SUBPROCESS_SCRIPT)
    # -S: no site processing, so the editable install's .pth finder never runs; only the
    # directory holding torch is on the path, and the cwd is outside the repository.
    torch_parent = os.path.dirname(os.path.dirname(torch.__file__))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = torch_parent
    proc = subprocess.run(
        [sys.executable, "-S", "check.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt")
    assert results["head.pt.config"] == head.config.to_dict()
    assert results["head.pt.provenance"] == {"source": "config"}
    assert results["model.pt.provenance"] == {"source": "explicit"}
    for got, want in zip(results["head.pt"], flat(head(maps, thr))):
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    for got, want in zip(results["model.pt"], flat(model(images))):
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


class _MaskPrefix(nn.Module):
    """The stages before labeling, which torch.export handles (see docs/deployment.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("roi", torch.tensor([0.1, 0.0, 0.8, 0.9], dtype=torch.float64))

    def forward(self, anomaly_map: Tensor, pixel_threshold: Tensor):
        mask = binarize(anomaly_map, pixel_threshold, self.roi)
        mask = closing(opening(mask, 3), 5)
        roi_max, roi_mean = roi_stats(anomaly_map, self.roi)
        return mask, roi_max, roi_mean


def test_torch_export_prefix_with_dynamic_batch():
    module = _MaskPrefix()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(
        module,
        (torch.rand(4, 1, 32, 32), torch.rand(4)),
        dynamic_shapes={"anomaly_map": {0: batch}, "pixel_threshold": {0: batch}},
    )
    exported = ep.module()
    for b in (1, 3, 7):
        x, t = torch.rand(b, 1, 32, 32), torch.rand(b) * 0.5 + 0.3
        for got, want in zip(exported(x, t), module(x, t)):
            assert torch.equal(got, want)


# ----------------------------------------------------------------------------
# torch.export (.pt2) and ONNX
# ----------------------------------------------------------------------------


EXPORT_CFG = dict(CFG, image_threshold=0.8)


def oracle_maps():
    """Realistic maps plus adversarial ones (NaN, full, empty, a 1-pixel-wide spiral)."""
    from tests.test_head import realistic_maps

    maps = torch.from_numpy(realistic_maps(5, 37, 45, seed=7))[:, None]
    maps[1, 0, 5:9, 5:9] = float("nan")
    maps[2] = 0.9  # full
    maps[3] = 0.0  # empty
    spiral = torch.zeros(37, 45)
    top, left, bottom, right = 2, 2, 34, 42
    while top < bottom and left < right:
        spiral[top, left : right + 1] = 0.95
        spiral[top : bottom + 1, right] = 0.95
        spiral[bottom, left : right + 1] = 0.95
        spiral[top + 2 : bottom + 1, left] = 0.95
        if left + 2 <= right:
            spiral[top + 2, left : left + 3] = 0.95
        top, left, bottom, right = top + 4, left + 4, bottom - 4, right - 4
    maps[4, 0] = spiral
    return maps


def assert_static_equal(got: Dict[str, Tensor], want: StaticDefects, uint8_mask: bool = False):
    """Integer outputs bit-equal, float outputs to float32 rounding."""
    assert list(got) == list(StaticDefects._fields)
    for name, w in want._asdict().items():
        g = got[name]
        if name == "mask" and uint8_mask:
            assert g.dtype == torch.uint8 and set(g.unique().tolist()) <= {0, 1}
            g = g.bool()
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if w.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1.2e-7, atol=0, equal_nan=True, msg=name)
        else:
            assert torch.equal(g, w), name


def test_format_from_extension():
    assert _format_for("a.onnx", None) == "onnx"
    assert _format_for("a.PT2", None) == "pt2"
    assert _format_for("a.pt", None) == "torchscript"
    assert _format_for("a", None) == "torchscript"
    assert _format_for("a.bin", "onnx") == "onnx"
    assert _format_for("a.onnx", "onnx") == "onnx"
    with pytest.raises(ValueError, match=r"--format pt2 contradicts the extension of 'a\.onnx'"):
        _format_for("a.onnx", "pt2")
    with pytest.raises(ValueError, match="--format torchscript contradicts"):
        _format_for("a.pt2", "torchscript")
    with pytest.raises(ValueError, match="format must be one of torchscript, pt2, onnx, got 'tf'"):
        _format_for("a.pb", "tf")


def test_export_from_config_torchscript_and_errors(tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"defects": dict(CFG)}))
    line = export_from_config(cfg_path, tmp_path / "head.pt")
    assert "torchscript" in line and str(tmp_path / "head.pt") in line
    module, meta = load_scripted(tmp_path / "head.pt")
    assert meta["config"] == DefectsConfig(**CFG).to_dict()
    maps = torch.rand(2, 1, 20, 24)
    assert_same(module(maps), DefectHead(DefectsConfig(**CFG))(maps))
    with pytest.raises(ValueError, match="--map-output needs --detector"):
        export_from_config(cfg_path, tmp_path / "x.pt", map_output=1)
    with pytest.raises(ValueError, match="--threshold-input is for pt2 and onnx"):
        export_from_config(cfg_path, tmp_path / "x.pt", threshold_input=True)
    with pytest.raises(ValueError, match="contradicts the extension"):
        export_from_config(cfg_path, tmp_path / "x.onnx", "pt2")
    det = tmp_path / "det.pt"
    torch.jit.save(torch.jit.script(ConvDetector()), str(det))
    with pytest.raises(ValueError, match=r"needs the detector as a torch\.export program"):
        export_from_config(cfg_path, tmp_path / "x.pt2", detector=det)
    with pytest.raises(ValueError, match="cannot load TorchScript"):
        export_from_config(cfg_path, tmp_path / "x.pt", detector=cfg_path)
    no_k = tmp_path / "nok.json"
    no_k.write_text(json.dumps({"defects": {"pixel_threshold": 0.5}}))
    with pytest.raises(ValueError, match=r"config\.max_regions must be set to export"):
        export_from_config(no_k, tmp_path / "x.pt2")
    no_thr = tmp_path / "nothr.json"
    no_thr.write_text(json.dumps({"defects": {"max_regions": 3}}))
    with pytest.raises(ValueError, match="pixel_threshold=None: set one, or export with"):
        export_from_config(no_thr, tmp_path / "x.pt2")
    assert not any(p.name.startswith("x.") for p in tmp_path.iterdir())


def test_export_argument_errors(tmp_path):
    cfg = DefectsConfig(**CFG)
    with pytest.raises(TypeError, match="head must be a DefectHead or a DefectsConfig"):
        export_pt2(torch.jit.script(DefectHead(cfg)), tmp_path / "x.pt2")
    with pytest.raises(ValueError, match=r"example must be a \(B, 1, H, W\) anomaly map"):
        export_pt2(cfg, tmp_path / "x.pt2", torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="example must have batch, height and width >= 2"):
        export_pt2(cfg, tmp_path / "x.pt2", torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="example must be given with a detector"):
        export_pt2(cfg, tmp_path / "x.pt2", detector=ConvDetector())
    with pytest.raises(TypeError, match="a TorchScript detector cannot be re-exported"):
        export_pt2(
            cfg,
            tmp_path / "x.pt2",
            torch.rand(2, 3, 8, 8),
            detector=torch.jit.script(ConvDetector()),
        )
    with pytest.raises(ValueError, match="output needs a detector"):
        export_pt2(cfg, tmp_path / "x.pt2", output=1)


PT2_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    try:
        import torchdefects  # noqa: F401
        sys.exit("torchdefects importable")
    except ImportError:
        pass
    extra = {"defects_config.json": "", "threshold_provenance.json": "", "torchdefects.json": ""}
    program = torch.export.load("head.pt2", extra_files=extra).module()
    maps, thr = torch.load("inputs.pt")
    out = program(maps, thr)
    torch.save({"out": dict(out), "config": json.loads(extra["defects_config.json"]),
                "meta": json.loads(extra["torchdefects.json"])}, "results.pt")
    """
)


def test_pt2_matches_eager_and_loads_without_torchdefects(tmp_path):
    cfg = DefectsConfig(**EXPORT_CFG)
    head = DefectHead(cfg, static_output=True)
    path = tmp_path / "head.pt2"
    export_pt2(head, path, threshold_input=True)
    module, meta = load_pt2(path)
    assert meta["config"] == cfg.to_dict() and meta["provenance"] == {"source": "config"}
    assert meta["meta"]["inputs"] == ["anomaly_map", "pixel_threshold"]
    maps = oracle_maps()
    thr = torch.tensor([0.55, 0.6, 0.5, 0.6, 0.9])
    want = head(maps, thr)
    assert want.num_regions.sum() > 3
    assert_static_equal(module(maps, thr), want)
    # other batch, height and width than the example: the dims are dynamic
    small = maps[1:4, :, 3:30, 2:41].contiguous()
    assert_static_equal(module(small, thr[1:4]), head(small, thr[1:4]))
    # a process where torchdefects cannot be imported
    torch.save((maps, thr), tmp_path / "inputs.pt")
    (tmp_path / "check.py").write_text(PT2_SCRIPT)
    torch_parent = os.path.dirname(os.path.dirname(torch.__file__))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = torch_parent
    proc = subprocess.run(
        [sys.executable, "-S", "check.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt")
    assert results["config"] == cfg.to_dict() and results["meta"]["program"] == "pt2"
    assert_static_equal(results["out"], want)


def test_pt2_with_detector(tmp_path, images):
    cfg = DefectsConfig(**CFG)
    detector = DictDetector().eval()
    path = tmp_path / "model.pt2"
    export_pt2(DefectHead(cfg), path, images[:2], detector=detector, output="anomaly_map")
    module, _ = load_pt2(path)
    want = DefectHead(cfg, static_output=True)(detector(images)["anomaly_map"])
    assert want.num_regions.sum() > 0
    assert_static_equal(module(images), want)


@pytest.mark.slow
def test_onnx_matches_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    cfg = DefectsConfig(**EXPORT_CFG)
    head = DefectHead(cfg, static_output=True)
    path = tmp_path / "head.onnx"
    export_onnx(head, path, threshold_input=True)
    meta = onnx_metadata(path)
    assert meta["config"] == cfg.to_dict() and meta["meta"]["program"] == "onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["anomaly_map", "pixel_threshold"]
    assert [o.name for o in session.get_outputs()] == list(StaticDefects._fields)
    maps = oracle_maps()
    thr = torch.tensor([0.55, 0.6, 0.5, 0.6, 0.9])
    for x, t in ((maps, thr), (maps[1:4, :, 3:30, 2:41].contiguous(), thr[1:4])):
        outs = session.run(None, {"anomaly_map": x.numpy(), "pixel_threshold": t.numpy()})
        got = {n: torch.from_numpy(o) for n, o in zip(StaticDefects._fields, outs)}
        assert_static_equal(got, head(x, t), uint8_mask=True)


def _doc_blocks():
    """The Python blocks of docs/deployment.md: (before the torch.export section, from it)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "deployment.md")) as f:
        text = f.read()
    cut = text.index("## torch.export")
    blocks = [re.findall(r"```python\n(.*?)```", part, re.S) for part in (text[:cut], text[cut:])]
    return blocks[0], blocks[1]


def _run_blocks(blocks, namespace):
    for code in blocks:
        exec(compile(code, "docs/deployment.md", "exec"), namespace)


def test_deployment_doc_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before, _ = _doc_blocks()
    assert len(before) >= 5
    _run_blocks(before, {})


@pytest.mark.slow
def test_deployment_doc_export_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    before, after = _doc_blocks()
    namespace: Dict[str, object] = {}
    _run_blocks(before + after, namespace)
    assert (tmp_path / "head.onnx").exists() and (tmp_path / "head.pt2").exists()


def test_export_from_config_pt2_with_pt2_detector(tmp_path, images):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"defects": dict(CFG)}))
    detector = TupleDetector().eval()
    det = torch.export.export(detector, (images[:2],))
    torch.export.save(det, str(tmp_path / "det.pt2"))
    line = export_from_config(
        cfg_path, tmp_path / "model.pt2", detector=tmp_path / "det.pt2", map_output=1
    )
    assert "detector + DefectHead (pt2" in line
    module, meta = load_pt2(tmp_path / "model.pt2")
    assert meta["meta"]["inputs"] == ["images"]
    want = DefectHead(DefectsConfig(**CFG), static_output=True)(detector(images[:2])[1])
    assert_static_equal(module(images[:2]), want)
