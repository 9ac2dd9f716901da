"""torchdefects demo: runs on made-up data and finds its planted defects."""

import os

import numpy as np
import scipy.ndimage as ndi
import torch
from PIL import Image

from torchdefects import files as tdio
from torchdefects.cli import main
from torchdefects.demo import PatchGaussianDetector, make_surface


def test_demo_finds_planted_defects(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "18 of 18 planted defects are covered by a region" in printed and out in printed
    assert os.path.join(out, "results", "report.html") in printed  # where to look
    assert "torchdefects run --images" in printed  # and what to try next
    assert os.path.isfile(os.path.join(out, "results", "report.html"))
    res = os.path.join(out, "results")
    recs = tdio.read_jsonl(os.path.join(res, "results.jsonl")).records
    assert len(recs) == 18
    gt_dir = os.path.join(out, "data", "ground_truth")
    for rec in recs:
        name = os.path.basename(rec["input"])
        mask_path = os.path.join(res, rec["defects"]["mask"]["path"])
        with Image.open(mask_path) as im:
            found = np.asarray(im) > 0
        assert os.path.isfile(os.path.join(res, "overlays", name + ".png"))
        gt_path = os.path.join(gt_dir, name)
        if name.startswith("good"):
            assert not os.path.exists(gt_path)
            assert rec["defects"]["regions"] == [], name  # no false alarm on normal parts
            continue
        with Image.open(gt_path) as im:
            gt = np.asarray(im) > 0
        labels, n = ndi.label(gt, np.ones((3, 3), bool))
        for k in range(1, n + 1):  # every planted defect (GT component) is touched
            assert (found & (labels == k)).any(), (name, k)
        # and the found pixels lie on or near defects
        near = ndi.binary_dilation(gt, iterations=6)
        # the patch detector sees 7x7 neighbourhoods: masks spread a few pixels past a defect
        assert (found & ~near).sum() <= 0.1 * found.sum(), name


def test_patch_gaussian_detector_scripts_and_scores_defects_higher():
    rng = np.random.default_rng(0)
    normal = torch.from_numpy(np.stack([make_surface(rng, 48) for _ in range(6)])).float()
    imgs = normal[:, None].repeat(1, 3, 1, 1)
    det = PatchGaussianDetector.fit(imgs[:5], patch=5)
    scripted = torch.jit.script(det)
    test = imgs[5:].clone()
    test[:, :, 20:26, 20:26] = 0.0  # a dark square
    with torch.no_grad():
        m = det(test)
        torch.testing.assert_close(scripted(test), m)
    assert m.shape == (1, 1, 48, 48)
    assert m[0, 0, 21:25, 21:25].min() > 2 * m[0, 0, :10, :10].max()
