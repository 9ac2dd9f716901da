"""evaluate: folder pairing, metrics.json, sweep, CLI, supervised calibration, demo example."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from torchdefects.cli import build_parser
from torchdefects.config import DefectsConfig, load_config, save_config
from torchdefects.evaluate import (
    add_evaluate_command,
    add_supervised_calibrate_arguments,
    calibrate_supervised,
    evaluate_dir,
    pair_ground_truth,
    read_gt_mask,
    run_supervised_calibrate,
)
from torchdefects.metrics import DefectMetrics
from torchdefects.supervised import segf1_threshold


def _folder(tmp_path, n=6, h=24, w=20, seed=0):
    """Maps (npy, one nested), masks (PNG 0/255 and npy; two parts without a mask)."""
    rng = np.random.default_rng(seed)
    maps_dir, gt_dir = tmp_path / "maps", tmp_path / "gt"
    (maps_dir / "sub").mkdir(parents=True)
    (gt_dir / "sub").mkdir(parents=True)
    maps, gts = [], []
    for i in range(n):
        m = rng.random((h, w)).astype(np.float32)
        g = np.zeros((h, w), bool)
        if i >= 2:
            y, x = rng.integers(2, h - 6), rng.integers(2, w - 6)
            g[y : y + 4, x : x + 3] = True
            m[g] += 0.5
        name = f"part_{i:02d}"
        rel = f"sub/{name}" if i == 5 else name
        np.save(maps_dir / f"{rel}.npy", m)
        if i >= 2:
            if i % 2:
                np.save(gt_dir / f"{rel}.npy", g)
            else:
                Image.fromarray(g.astype(np.uint8) * 255).save(gt_dir / f"{rel}.png")
        maps.append(m)
        gts.append(g)
    return str(maps_dir), str(gt_dir), np.stack(maps), np.stack(gts)


def _order(maps_dir):
    """Map files in path order (the evaluation order)."""
    return [p for p, _ in pair_ground_truth(maps_dir, None)[0]]


def test_pairing_by_stem(tmp_path):
    maps_dir, gt_dir, _, _ = _folder(tmp_path)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(os.path.join(gt_dir, "orphan.png"))
    pairs, unused = pair_ground_truth(maps_dir, gt_dir)
    got = {os.path.relpath(p, maps_dir): g and os.path.relpath(g, gt_dir) for p, g in pairs}
    assert got == {
        "part_00.npy": None,
        "part_01.npy": None,
        "part_02.npy": "part_02.png",
        "part_03.npy": "part_03.npy",
        "part_04.npy": "part_04.png",
        "sub/part_05.npy": "sub/part_05.npy",
    }
    assert [os.path.basename(u) for u in unused] == ["orphan.png"]
    np.save(os.path.join(gt_dir, "part_02.npy"), np.zeros((24, 20), bool))
    with pytest.raises(ValueError, match="two masks for 'part_02'"):
        pair_ground_truth(maps_dir, gt_dir)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        pair_ground_truth(maps_dir, os.path.join(gt_dir, "nope"))


def test_read_gt_mask(tmp_path):
    g = np.zeros((5, 7), bool)
    g[1:3, 2:6] = True
    Image.fromarray(g.astype(np.uint8) * 255).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", g[None])
    np.save(tmp_path / "c.npy", g.astype(np.uint8))
    for name in ("a.png", "b.npy", "c.npy"):
        assert np.array_equal(read_gt_mask(str(tmp_path / name), (5, 7)), g)
    assert not read_gt_mask(None, (5, 7)).any()
    with pytest.raises(ValueError, match=r"mask shape \[5, 7\] does not match its map's \[5, 8\]"):
        read_gt_mask(str(tmp_path / "a.png"), (5, 8))


def test_evaluate_dir_equals_one_shot_metrics(tmp_path):
    maps_dir, gt_dir, maps, gts = _folder(tmp_path)
    order = [int(os.path.basename(p)[5:7]) for p in _order(maps_dir)]
    maps, gts = maps[order], gts[order]
    cfg = DefectsConfig(pixel_threshold=0.9, min_area=2)
    out = tmp_path / "out"
    r = evaluate_dir(maps_dir, gt_dir, cfg, out=str(out), batch_size=4)
    m = DefectMetrics(cfg)
    m.update(torch.from_numpy(maps), torch.from_numpy(gts))
    assert r["metrics"] == m.compute()
    assert r["metrics"]["pixel_auroc"] == pytest.approx(roc_auc_score(gts.ravel(), maps.ravel()))
    assert r["segf1"]["pixel_threshold"] == segf1_threshold(m)[0]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["metrics"]["pixel"] == r["metrics"]["pixel"]
    assert on_disk["inputs"]["map_count"] == 6 and on_disk["inputs"]["maps_with_gt_mask"] == 4
    assert r["sweep"] == [] and not (out / "sweep.png").exists()


def test_sweep_rows_equal_metrics_at_each_threshold(tmp_path):
    maps_dir, gt_dir, maps, gts = _folder(tmp_path, seed=1)
    order = [int(os.path.basename(p)[5:7]) for p in _order(maps_dir)]
    maps, gts = maps[order], gts[order]
    cfg = DefectsConfig(pixel_threshold=0.8, open_ksize=3)
    out = tmp_path / "out"
    r = evaluate_dir(maps_dir, gt_dir, cfg, out=str(out), sweep=5)
    rows = r["sweep"]
    assert len(rows) == 7  # 5 steps + the configured and the segf1 thresholds
    assert sum(row["configured"] for row in rows) == 1 and sum(row["segf1"] for row in rows) == 1
    ts = [row["pixel_threshold"] for row in rows]
    assert ts == sorted(ts)
    for row in rows[::3]:
        m = DefectMetrics(DefectsConfig(pixel_threshold=row["pixel_threshold"], open_ksize=3))
        m.update(torch.from_numpy(maps), torch.from_numpy(gts))
        c = m.compute()
        assert row["pixel_f1"] == c["pixel"]["f1"]
        assert row["region_recall"] == c["region"]["recall"]
        assert row["false_alarms_per_image"] == c["region"]["false_alarms"] / 6
    with Image.open(out / "sweep.png") as im:
        assert im.size == (900, 580) and im.mode == "RGB"


def _cli(argv):
    parser = build_parser([add_evaluate_command])
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_evaluate(tmp_path, capsys):
    maps_dir, gt_dir, _, _ = _folder(tmp_path, seed=2)
    cfg = tmp_path / "config.json"
    save_config(DefectsConfig(pixel_threshold=0.95), str(cfg))
    out = tmp_path / "out"
    code = _cli(
        [
            "evaluate",
            "--maps",
            maps_dir,
            "--gt-masks",
            gt_dir,
            "--config",
            str(cfg),
            "-o",
            str(out),
            "--sweep",
            "4",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "pixel  AUROC" in text and "region @ 0.95" in text and "<- configured" in text
    assert (out / "metrics.json").exists() and (out / "sweep.png").exists()
    code = _cli(["evaluate", "--maps", str(tmp_path / "none"), "-o", str(out)])
    assert code == 2
    assert "torchdefects evaluate: error: inputs:" in capsys.readouterr().err
    code = _cli(["evaluate", "--maps", maps_dir, "-o", str(out), "--bins", "40"])
    assert code == 2 and "bins must be in 1..22" in capsys.readouterr().err


def test_no_gt_folder_means_all_normal(tmp_path):
    maps_dir, _, _, _ = _folder(tmp_path, seed=3)
    r = evaluate_dir(maps_dir, None, DefectsConfig(pixel_threshold=0.99))
    assert r["metrics"]["defective_images"] == 0 and r["metrics"]["pixel_auroc"] is None
    assert r["segf1"] is None
    assert r["metrics"]["region"]["false_alarms_per_normal_image"] is not None


def test_calibrate_supervised(tmp_path):
    maps_dir, gt_dir, maps, gts = _folder(tmp_path, seed=4)
    res = calibrate_supervised(maps_dir, gt_dir, image_strategy="f1")
    m = DefectMetrics()
    m.update(torch.from_numpy(maps), torch.from_numpy(gts))
    assert res["pixel_threshold"] == segf1_threshold(m)[0]
    assert res["pixel_threshold_provenance"]["method"] == "supervised_segf1"
    score = maps.reshape(6, -1).max(1)
    y = gts.reshape(6, -1).any(1)
    assert res["image_threshold_provenance"]["method"] == "image_f1"
    assert res["image_threshold_provenance"]["f1"] == 1.0  # defects raise the max by 0.5
    assert score[~y].max() < res["image_threshold"] <= score[y].min()
    res = calibrate_supervised(maps_dir, gt_dir, image_strategy="normal_quantile", image_q=0.5)
    assert res["image_threshold"] == float(np.quantile(score[~y].astype(np.float64), 0.5))
    with pytest.raises(ValueError, match="image_strategy must be"):
        calibrate_supervised(maps_dir, gt_dir, image_strategy="best")


def test_supervised_calibrate_wiring(tmp_path):
    import argparse

    maps_dir, gt_dir, _, _ = _folder(tmp_path, seed=5)
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    parser.add_argument("--maps")
    parser.add_argument("--category")
    add_supervised_calibrate_arguments(parser)
    args = parser.parse_args(
        [
            "--maps",
            maps_dir,
            "--strategy",
            "segf1",
            "--gt-masks",
            gt_dir,
            "--image-strategy",
            "normal_quantile",
            "--image-q",
            "0.5",
            "--category",
            "bottle",
        ]
    )
    raw = run_supervised_calibrate(args, {"defects": {"min_area": 2}})
    block = raw["per_category"]["bottle"]["defects"]
    assert block["pixel_threshold_provenance"]["method"] == "supervised_segf1"
    expected = calibrate_supervised(maps_dir, gt_dir, image_strategy="normal_quantile", image_q=0.5)
    assert block["pixel_threshold"] == expected["pixel_threshold"]
    assert block["image_threshold"] == expected["image_threshold"]
    assert block["image_threshold_provenance"]["method"] == "normal_quantile"
    assert load_config(raw, "bottle").image_threshold_provenance["method"] == "normal_quantile"
    assert raw["defects"] == {"min_area": 2}
    args = parser.parse_args(["--maps", maps_dir, "--strategy", "segf1"])
    with pytest.raises(ValueError, match="needs --gt-masks"):
        run_supervised_calibrate(args, {})


def test_demo_worked_example(tmp_path):
    from torchdefects.demo import run_demo
    from torchdefects.evaluate import write_demo_maps

    demo = str(tmp_path / "demo")
    run_demo(demo, n_train=8, n_calib=4, n_good_test=2, n_bad_test=4, size=64, quiet=True)
    maps_dir, gt_dir, config = write_demo_maps(demo)
    r = evaluate_dir(maps_dir, gt_dir, config, out=str(tmp_path / "eval"), sweep=3)
    m = r["metrics"]
    assert m["images"] == 6 and m["defective_images"] == 4
    assert m["pixel_auroc"] > 0.9 and m["region"]["recall"] is not None
    assert r["inputs"]["unused_gt_masks"] == []


def test_evaluate_images_through_a_detector(tmp_path):
    """evaluate --images --detector: the same metrics as evaluating the detector's maps."""
    from PIL import Image

    from torchdefects.cli import main

    class Det(torch.nn.Module):
        def forward(self, x):
            return {"anomaly_map": x.mean(1, keepdim=True)}

    det = tmp_path / "det.pt"
    torch.jit.save(torch.jit.script(Det()), str(det))
    imgs, maps, gt = tmp_path / "imgs", tmp_path / "maps", tmp_path / "gt"
    for d in (imgs, maps, gt):
        d.mkdir()
    rng = np.random.default_rng(8)
    for i in range(4):
        u8 = rng.integers(0, 120, (16, 14, 3), dtype=np.uint8)
        if i % 2:
            u8[4:9, 3:8] = 230
            mask = np.zeros((16, 14), np.uint8)
            mask[4:9, 3:8] = 255
            Image.fromarray(mask).save(gt / f"p{i}.png")
        Image.fromarray(u8).save(imgs / f"p{i}.png")
        x = torch.from_numpy(u8.copy()).permute(2, 0, 1)[None].float() / 255.0
        np.save(maps / f"p{i}.npy", Det()(x)["anomaly_map"][0, 0].numpy())
    cfg = tmp_path / "cfg.json"
    save_config(DefectsConfig(pixel_threshold=0.6, min_area=2), str(cfg))
    common = ["--gt-masks", str(gt), "--config", str(cfg), "--quiet"]
    assert main(["evaluate", "--images", str(imgs), "--detector", str(det), "--map-output",
                 "anomaly_map", "-o", str(tmp_path / "e1"), *common]) == 0  # fmt: skip
    assert main(["evaluate", "--maps", str(maps), "-o", str(tmp_path / "e2"), *common]) == 0
    got = json.loads((tmp_path / "e1" / "metrics.json").read_text())["metrics"]
    want = json.loads((tmp_path / "e2" / "metrics.json").read_text())["metrics"]
    assert got == want
    assert main(["evaluate", "--images", str(imgs), "-o", str(tmp_path / "e3"), *common]) == 2
