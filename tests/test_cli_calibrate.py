import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from torchdefects.calibration import PixelThresholdCalibrator
from torchdefects.cli import main
from torchdefects.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _maps_dir(tmp_path, bad=True):
    """Normal maps in every format, two sizes, nested; returns (dir, float64 oracle pixels)."""
    rng = np.random.default_rng(0)
    d = tmp_path / "maps"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    arrays = []

    def m(shape):
        a = (rng.integers(0, 500, size=shape) / 499.0).astype(np.float32)  # ties
        arrays.append(a.reshape(shape[-2:]))
        return a

    for i in range(5):
        np.save(d / "a" / f"m{i}.npy", m((24, 32)))
    np.savez(d / "a" / "z.npz", anomaly_map=m((1, 24, 32)), image=np.zeros((2, 2)))
    torch.save(torch.from_numpy(m((1, 1, 16, 20))), d / "b" / "t.pt")
    Image.fromarray(m((16, 20)), mode="F").save(d / "b" / "f.tif")
    np.save(d / "b" / "n.npy", m((16, 20)))
    if bad:
        (d / "b" / "broken.npy").write_bytes(b"not a map")
        np.save(d / "b" / "wrong_shape.npy", np.zeros((3, 4, 5), np.float32))
    return d, arrays


def _oracle(arrays, q, roi=None):
    import math

    vals = []
    for a in arrays:
        h, w = a.shape
        if roi is not None:
            x1, y1, x2, y2 = roi
            a = a[math.floor(y1 * h) : math.ceil(y2 * h), math.floor(x1 * w) : math.ceil(x2 * w)]
        vals.append(a.ravel())
    return float(np.quantile(np.concatenate(vals).astype(np.float64), q))


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_calibrate_end_to_end_with_bad_files(tmp_path, capsys):
    d, arrays = _maps_dir(tmp_path)
    out = str(tmp_path / "cfg.json")
    rc = main(["calibrate", "--maps", str(d), "--q", "0.99", "-o", out, "--batch-size", "3"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "2 of 11 maps failed" in err
    assert "broken.npy" in err and "wrong_shape.npy" in err
    cfg = _read(out)
    assert cfg["schema_version"] == 2
    t = cfg["defects"]["pixel_threshold"]
    assert t == _oracle(arrays, 0.99)
    prov = cfg["defects"]["pixel_threshold_provenance"]
    assert prov["source"] == "train_dir" and prov["q"] == 0.99
    assert prov["calibration_map_count"] == 9
    assert prov["calibration_pixel_count"] == sum(a.size for a in arrays)
    assert load_config(out).pixel_threshold == t

    # unreadable files are not in the fingerprint: same maps without them, same fingerprint
    d2, _ = _maps_dir(tmp_path / "clean", bad=False)
    out2 = str(tmp_path / "cfg2.json")
    assert main(["calibrate", "--maps", str(d2), "--q", "0.99", "-o", out2, "--quiet"]) == 0
    assert (
        _read(out2)["defects"]["pixel_threshold_provenance"]["fingerprint"] == prov["fingerprint"]
    )


def test_calibrate_default_q_is_the_library_default(tmp_path):
    d, arrays = _maps_dir(tmp_path, bad=False)
    out = str(tmp_path / "cfg.json")
    assert main(["calibrate", "--maps", str(d / "**" / "*.npy"), "-o", out, "--quiet"]) == 0
    q = PixelThresholdCalibrator().q
    prov = _read(out)["defects"]["pixel_threshold_provenance"]
    assert prov["q"] == q
    npy = [a for a in arrays[:5]] + [arrays[-1]]  # the .npy files, in sorted path order
    assert _read(out)["defects"]["pixel_threshold"] == _oracle(npy, q)


def test_calibrate_updates_config_and_category(tmp_path, capsys):
    d, arrays = _maps_dir(tmp_path, bad=False)
    base = {
        "model": {"name": "x"},
        "defects": {"min_area": 5, "roi_xyxy_norm": [0.0, 0.0, 0.5, 1.0]},
        "per_category": {"cable": {"defects": {"min_area": 2}}},
    }
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps(base))
    out = str(tmp_path / "out.json")
    args = ["calibrate", "--maps", str(d), "--q", "0.9", "--config", str(inp), "-o", out]
    assert main([*args, "--category", "bottle", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    cfg = _read(out)
    assert cfg["model"] == {"name": "x"}  # other keys kept
    assert cfg["defects"] == base["defects"]  # global block untouched
    assert cfg["per_category"]["cable"] == base["per_category"]["cable"]
    block = cfg["per_category"]["bottle"]["defects"]
    # no --roi-xyxy-norm: the config's ROI is the one calibrated on (and not rewritten)
    assert block["pixel_threshold"] == _oracle(arrays, 0.9, [0.0, 0.0, 0.5, 1.0])
    assert block["pixel_threshold_provenance"]["roi_xyxy_norm"] == [0.0, 0.0, 0.5, 1.0]
    assert "roi_xyxy_norm" not in block
    bottle = load_config(out, "bottle")
    assert bottle.min_area == 5 and bottle.pixel_threshold == block["pixel_threshold"]

    # OUT exists and no --config: OUT is updated in place; an explicit ROI is written too
    roi = ["0.25", "0", "1", "0.5"]
    args = ["calibrate", "--maps", str(d), "--q", "0.5", "-o", out, "--quiet"]
    assert main([*args, "--roi-xyxy-norm", *roi]) == 0
    cfg2 = _read(out)
    assert cfg2["per_category"]["bottle"] == cfg["per_category"]["bottle"]
    assert cfg2["defects"]["pixel_threshold"] == _oracle(arrays, 0.5, [0.25, 0.0, 1.0, 0.5])
    assert cfg2["defects"]["roi_xyxy_norm"] == [0.25, 0.0, 1.0, 0.5]
    assert cfg2["defects"]["min_area"] == 5


def test_calibrate_nan_policy(tmp_path, capsys):
    d = tmp_path / "maps"
    d.mkdir()
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    np.save(d / "a.npy", a)
    b = a.copy()
    b[0, 0] = np.nan
    np.save(d / "b.npy", b)
    out = str(tmp_path / "c.json")
    assert main(["calibrate", "--maps", str(d), "--q", "0.5", "-o", out, "--quiet"]) == 3
    assert "b.npy: 1 NaN pixels in the ROI" in capsys.readouterr().err
    assert _read(out)["defects"]["pixel_threshold"] == float(np.quantile(a.astype(float), 0.5))
    args = ["calibrate", "--maps", str(d), "--q", "0.5", "-o", out, "--quiet"]
    assert main([*args, "--nan-policy", "omit"]) == 0
    both = np.concatenate([a.ravel(), b.ravel()[1:]]).astype(np.float64)
    defects = _read(out)["defects"]
    assert defects["pixel_threshold"] == float(np.quantile(both, 0.5))
    assert defects["pixel_threshold_provenance"]["nan_pixel_count"] == 1


def test_calibrate_second_pass(tmp_path, monkeypatch, capsys):
    # No margin: high maps first make the single pass inexact; the CLI reads the files again.
    from torchdefects import calibration as calmod

    monkeypatch.setattr(calmod, "_MIN_PRUNE", 8)
    monkeypatch.setattr(
        calmod.PixelThresholdCalibrator,
        "_target",
        lambda self: self._need(self._fixed_count or max(self._n, 1)),
    )
    d = tmp_path / "maps"
    d.mkdir()
    arrays = [np.linspace(10, 20, 100, dtype=np.float32).reshape(10, 10)]
    arrays += [np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10) + i for i in range(5)]
    for i, a in enumerate(arrays):
        np.save(d / f"{i}.npy", a)
    out = str(tmp_path / "c.json")
    assert main(["calibrate", "--maps", str(d), "--q", "0.9", "-o", out, "--batch-size", "1"]) == 0
    assert "second pass" in capsys.readouterr().err
    assert _read(out)["defects"]["pixel_threshold"] == _oracle(arrays, 0.9)


@pytest.mark.parametrize(
    "extra,code,msg",
    [
        (["--q", "1.5"], 2, "q must be in [0, 1], got 1.5"),
        (["--batch-size", "0"], 2, "--batch-size must be >= 1, got 0"),
        (["--device", "tpu"], 2, "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--roi-xyxy-norm", "0", "0", "1"], 2, "expected 4 arguments"),
        (["--nan-policy", "skip"], 2, "invalid choice: 'skip'"),
    ],
)
def test_calibrate_usage_errors(tmp_path, capsys, extra, code, msg):
    d, _ = _maps_dir(tmp_path, bad=False)
    out = str(tmp_path / "c.json")
    assert main(["calibrate", "--maps", str(d), "-o", out, *extra]) == code
    assert msg in capsys.readouterr().err
    assert not os.path.exists(out)


def test_calibrate_input_errors(tmp_path, capsys):
    out = str(tmp_path / "c.json")
    assert main(["calibrate", "--maps", str(tmp_path / "none" / "*.npy"), "-o", out]) == 2
    assert "no files matching" in capsys.readouterr().err
    d = tmp_path / "maps"
    d.mkdir()
    (d / "x.npy").write_bytes(b"junk")
    (d / "y.pt").write_bytes(b"junk")
    assert main(["calibrate", "--maps", str(d), "-o", out]) == 1
    err = capsys.readouterr().err
    assert "none of the 2 maps could be used" in err and "x.npy" in err and "y.pt" in err
    assert not os.path.exists(out)
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text('{"defects": {"open_ksize": 4}}')
    np.save(d / "ok.npy", np.zeros((4, 4), np.float32))
    assert main(["calibrate", "--maps", str(d), "--config", str(bad_cfg), "-o", out]) == 2
    assert "defects.open_ksize must be 0 or an odd integer >= 3, got 4" in capsys.readouterr().err
    assert main(["calibrate", "-o", out]) == 2
    assert "--maps" in capsys.readouterr().err
    assert main([]) == 2


def test_python_m_torchdefects(tmp_path):
    d, arrays = _maps_dir(tmp_path, bad=False)
    out = str(tmp_path / "c.json")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torchdefects", "calibrate", "--maps", str(d), "--q", "0.95"]
    r = subprocess.run([*cmd, "-o", out], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pixel_threshold = " in r.stderr and "calibrate: 9/9" in r.stderr
    assert _read(out)["defects"]["pixel_threshold"] == _oracle(arrays, 0.95)


def test_calibrate_segf1_from_gt_masks(tmp_path, capsys):
    """--strategy segf1: the threshold of best pixel F1 (sklearn's curve, lowest on ties)."""
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(3)
    maps_dir, gt_dir = tmp_path / "maps", tmp_path / "gt"
    maps_dir.mkdir()
    gt_dir.mkdir()
    values, labels = [], []
    for i in range(4):
        m = rng.random((12, 10)).astype(np.float32)
        gt = np.zeros((12, 10), bool)
        if i % 2:
            gt[3:7, 2:6] = True
            m[gt] += 0.6 * rng.random(int(gt.sum())).astype(np.float32)
            Image.fromarray((gt * 255).astype(np.uint8)).save(gt_dir / f"m{i}.png")
        np.save(maps_dir / f"m{i}.npy", m)
        values.append(m.ravel())
        labels.append(gt.ravel())
    out = tmp_path / "cfg.json"
    args = ["calibrate", "--maps", str(maps_dir), "--strategy", "segf1", "--gt-masks",
            str(gt_dir), "--image-strategy", "f1", "-o", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    precision, recall, thresholds = precision_recall_curve(
        np.concatenate(labels), np.concatenate(values).astype(np.float64)
    )
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    best = thresholds[np.flatnonzero(f1[:-1] == f1[:-1].max())[0]]
    cfg = load_config(str(out))
    assert cfg.pixel_threshold == pytest.approx(float(np.float32(best)), rel=0, abs=0)
    assert cfg.pixel_threshold_provenance["method"] == "supervised_segf1"
    assert cfg.image_threshold is not None
    assert cfg.image_threshold_provenance["method"] == "image_f1"
    assert main([*args[:5], "-o", str(out)]) == 2  # segf1 without --gt-masks
    assert "--gt-masks" in capsys.readouterr().err
