"""``torchdefects run`` / ``export`` from the command line: precedence, exit codes,
kill-and-resume, two gloo processes, and exported files loaded without torchdefects."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from torchdefects import files as tdio
from torchdefects.cli import main
from torchdefects.config import DefectsConfig, load_config
from torchdefects.head import DefectHead


def _maps(d, n, seed=0, h=16, w=16):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = (rng.random((h, w)) * 0.5).astype(np.float32)
        y, x = rng.integers(2, h - 6), rng.integers(2, w - 6)
        a[y : y + 4, x : x + 3] = 0.8 + 0.2 * rng.random((4, 3))
        a[y + 1, x + 1] = 0.3  # a hole for fill_holes to close
        if i % 3 == 0:
            a[h - 2, w - 2] = 0.9  # a one-pixel speck that min_area removes
        np.save(d / f"m{i:03d}.npy", a)
    return sorted(str(p) for p in d.iterdir())


def _regions(cfg, path):
    d = DefectHead(cfg)(torch.from_numpy(np.load(path))[None, None])
    return [
        (int(lab), [int(v) for v in box], int(area))
        for lab, box, area in zip(d.regions.label, d.regions.bbox_xyxy.tolist(), d.regions.area)
    ]


def _got(out):
    return [
        (
            r["input"],
            r["defects"]["pixel_threshold"],
            r["defects"]["pixel_threshold_provenance"]["source"],
            [(g["id"], g["bbox_xyxy"], g["area"]) for g in r["defects"]["regions"]],
        )
        for r in tdio.read_jsonl(os.path.join(out, "results.jsonl")).records
    ]


def test_flags_override_config_only_when_given(tmp_path):
    paths = _maps(tmp_path / "maps", 4)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "defects": {"pixel_threshold": 0.5, "min_area": 5, "fill_holes": True},
                "per_category": {"bolt": {"defects": {"pixel_threshold": 0.75}}},
            }
        )
    )
    base = ["run", "--maps", str(tmp_path / "maps"), "--config", str(cfg_path), "--quiet"]
    global_cfg = load_config(str(cfg_path), "bolt")
    assert global_cfg.pixel_threshold == 0.75

    cases = [
        ([], {"pixel_threshold": 0.75}, "infer_config"),
        # Flags equal to the library defaults (min_area 0, no fill) still override the file.
        (
            ["--defect-min-area", "0", "--no-defect-fill-holes"],
            {"pixel_threshold": 0.75, "min_area": 0, "fill_holes": False},
            "infer_config",
        ),
        (["--pixel-threshold", "0.6"], {"pixel_threshold": 0.6}, "explicit"),
        (
            ["--connectivity", "4", "--defect-max-regions", "1", "--defect-open-ksize", "3"],
            {"pixel_threshold": 0.75, "connectivity": 4, "max_regions": 1, "open_ksize": 3},
            "infer_config",
        ),
    ]
    seen = []
    for i, (flags, fields, source) in enumerate(cases):
        out = str(tmp_path / f"out{i}")
        assert main([*base, "--category", "bolt", "--out", out, *flags]) == 0
        want_cfg = dataclasses.replace(
            DefectsConfig(pixel_threshold=0.5, min_area=5, fill_holes=True), **fields
        )
        want = [(p, want_cfg.pixel_threshold, source, _regions(want_cfg, p)) for p in paths]
        assert _got(out) == want, flags
        seen.append(want)
    assert seen[0] != seen[1]  # the overrides changed the result
    assert all(any(w[3] for w in want) for want in seen[:3])


def test_exit_codes(tmp_path, capsys):
    _maps(tmp_path / "maps", 2)
    maps = str(tmp_path / "maps")
    out = str(tmp_path / "out")
    assert main(["run", "--maps", maps, "--out", out, "--quiet"]) == 2
    assert "requires a pixel threshold" in capsys.readouterr().err
    assert main(["run", "--maps", maps, "--pixel-threshold", "0.5"]) == 2  # no --out
    assert (
        main(["run", "--maps", maps, "--images", maps, "--out", out, "--pixel-threshold", "1"]) == 2
    )
    assert (
        main(
            [
                "run",
                "--maps",
                maps,
                "--out",
                out,
                "--pixel-threshold",
                "0.5",
                "--defect-open-ksize",
                "2",
            ]
        )
        == 2
    )
    assert "open_ksize must be 0 or an odd integer >= 3" in capsys.readouterr().err
    assert main(["run", "--maps", maps, "--out", out, "--pixel-threshold", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "2 inputs, 2 processed" in err and "0 errors" in err
    assert main(["run", "--maps", maps, "--out", out, "--pixel-threshold", "0.5"]) == 2
    capsys.readouterr()
    (tmp_path / "maps" / "broken.npy").write_bytes(b"\x93NUMPY broken")
    # Another input list is another run: resume is refused, naming what differs.
    assert main(["run", "--maps", maps, "--out", out, "--pixel-threshold", "0.5", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "inputs.count: 2 -> 3" in err and "inputs.fingerprint" in err
    assert (
        main(["run", "--maps", maps, "--out", out, "--pixel-threshold", "0.5", "--overwrite"]) == 3
    )
    assert "3 processed, 0 skipped" in capsys.readouterr().err
    recs = tdio.read_jsonl(os.path.join(out, "results.jsonl")).records
    assert [os.path.basename(r["input"]) for r in recs] == ["broken.npy", "m000.npy", "m001.npy"]


def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _lines(path):
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def test_sigkill_then_resume_gives_one_record_per_input(tmp_path):
    paths = _maps(tmp_path / "maps", 150, h=24, w=24)
    args = [
        "run",
        "--maps",
        str(tmp_path / "maps"),
        "--pixel-threshold",
        "0.6",
        "--defect-min-area",
        "2",
        "--save-masks",
        "png",
        "--save-overlays",
        "--regions-jsonl",
        "--batch-size",
        "3",
        "--quiet",
    ]
    ref = str(tmp_path / "ref")
    assert main([*args, "--out", ref]) == 0

    out = str(tmp_path / "out")
    results = os.path.join(out, "results.jsonl")
    cmd = [sys.executable, "-m", "torchdefects", *args, "--out", out]
    kills = 0
    for attempt, min_lines in enumerate((3, 40)):
        proc = subprocess.Popen(
            cmd + (["--resume"] if attempt else []), env=_env(), stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if _lines(results) >= min_lines:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += proc.returncode == -signal.SIGKILL
    assert kills >= 1, "the run finished before it could be killed"
    assert _lines(results) < len(paths)
    done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    contents = tdio.read_jsonl(results)
    assert contents.torn_line is None
    assert [r["input"] for r in contents.records] == paths
    # Byte for byte what an uninterrupted run writes, regions included.
    for name in ("results.jsonl", "regions.jsonl"):
        with open(os.path.join(ref, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    for r in contents.records:
        assert os.path.isfile(os.path.join(out, r["defects"]["mask"]["path"]))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(tmp_path):
    _maps(tmp_path / "maps", 9)
    (tmp_path / "maps" / "m004.npy").write_bytes(b"not a map")
    args = [
        "run",
        "--maps",
        str(tmp_path / "maps"),
        "--pixel-threshold",
        "0.6",
        "--save-masks",
        "npy",
        "--regions-jsonl",
        "--batch-size",
        "2",
        "--quiet",
    ]
    one = str(tmp_path / "one")
    assert main([*args, "--out", one]) == 3
    two = str(tmp_path / "two")
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env()
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            GLOO_SOCKET_IFNAME="lo",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "torchdefects", *args, "--out", two],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    codes, errs = [], []
    for p in procs:
        _, err = p.communicate(timeout=120)
        codes.append(p.returncode)
        errs.append(err)
        assert p.returncode in (0, 3), err
    assert codes[0] == 3  # rank 0 reports on the merged results
    # ... with the totals of every rank; the other ranks print no summary.
    assert "9 inputs, 9 processed, 0 skipped (already recorded), 1 errors" in errs[0], errs[0]
    assert "torchdefects run:" not in errs[1]
    for name in ("results.jsonl", "regions.jsonl"):
        with open(os.path.join(one, name), "rb") as a, open(os.path.join(two, name), "rb") as b:
            assert a.read() == b.read(), name
    journal = [".torchdefects.lock", "manifest.json"]
    assert sorted(os.listdir(two)) == [*journal, "masks", "regions.jsonl", "results.jsonl"]
    assert sorted(os.listdir(os.path.join(two, "masks"))) == sorted(
        os.listdir(os.path.join(one, "masks"))
    )


class _Det(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x: torch.Tensor):
        return (x.mean(dim=1, keepdim=True), torch.sigmoid(self.conv(x) * 4.0))


_LOAD_WITHOUT_TORCHDEFECTS = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torchdefects" or name.startswith("torchdefects."):
            raise ImportError("torchdefects is blocked in this test")
sys.meta_path.insert(0, _Block())
try:
    import torchdefects  # noqa: F401
    raise SystemExit("torchdefects was importable")
except ImportError:
    pass
import json, torch
extra = {"defects_config.json": ""}
m = torch.jit.load(sys.argv[1], _extra_files=extra)
x = torch.load(sys.argv[2])
d = m(x)
torch.save({"mask": d.mask, "bbox": d.regions.bbox_xyxy, "n": d.num_regions,
            "config": json.loads(extra["defects_config.json"])}, sys.argv[3])
"""


@pytest.mark.parametrize("with_detector", [False, True])
def test_export_then_load_without_torchdefects(tmp_path, with_detector):
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(
        json.dumps({"defects": {"pixel_threshold": 0.6, "open_ksize": 3, "min_area": 2}})
    )
    out = str(tmp_path / "model.pt")
    argv = ["export", "--config", str(cfg_path), "-o", out]
    torch.manual_seed(1)
    x = torch.rand(3, 3, 20, 24) * 0.5
    x[0, :, 4:10, 5:9] = 0.9  # a defect in image 0, two in image 2
    x[2, :, 12:16, 2:8] = 0.8
    x[2, :, 1:4, 15:22] = 0.95
    if with_detector:
        det = torch.jit.script(_Det())
        det.save(str(tmp_path / "det.pt"))
        argv += ["--detector", str(tmp_path / "det.pt"), "--map-output", "0"]
        maps = det(x)[0]
    else:
        x = x[:, :1]
        maps = x
    assert main(argv) == 0
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITHOUT_TORCHDEFECTS)
    res = subprocess.run(
        [sys.executable, str(script), out, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        env=_env(),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    got = torch.load(tmp_path / "y.pt")
    want = DefectHead(load_config(str(cfg_path)))(maps)
    assert torch.equal(got["mask"], want.mask)
    assert torch.equal(got["bbox"], want.regions.bbox_xyxy)
    assert torch.equal(got["n"], want.num_regions)
    assert got["config"]["pixel_threshold"] == 0.6 and got["config"]["open_ksize"] == 3
    assert want.num_regions.tolist() == [1, 0, 2]


def test_export_usage_errors(tmp_path, capsys):
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps({"defects": {"open_ksize": 4}}))
    assert main(["export", "--config", str(cfg_path), "-o", str(tmp_path / "m.pt")]) == 2
    assert "open_ksize" in capsys.readouterr().err
    cfg_path.write_text(json.dumps({"defects": {"pixel_threshold": 0.5}}))
    bad = ["export", "--config", str(cfg_path), "--map-output", "1", "-o", str(tmp_path / "m.pt")]
    assert main(bad) == 2


# ----------------------------------------------------------------------------
# pyimgano-named flags (issue #10 item 3) and record fields (item 4)
# ----------------------------------------------------------------------------


def _recs(out):
    return tdio.read_jsonl(os.path.join(str(out), "results.jsonl")).records


def test_defects_flags_and_image_score_label(tmp_path, capsys):
    paths = _maps(tmp_path / "maps", 4)
    base = ["run", "--maps", str(tmp_path / "maps"), "--pixel-threshold", "0.6", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "on"), "--defects"]) == 0
    assert main([*base, "--out", str(tmp_path / "off"), "--no-defects"]) == 0
    on, off = _recs(tmp_path / "on"), _recs(tmp_path / "off")
    for i, (a, b, p) in enumerate(zip(on, off, paths)):
        m = np.load(p)
        # Oracle: NumPy's max, and NumPy's shortest float32 text.
        want = float(str(np.float32(m.max())))
        assert a["index"] == b["index"] == i
        assert a["score"] == b["score"] == want and a["score_source"] == "roi_max"
        assert a["label"] == int(len(a["defects"]["regions"]) > 0)
        assert "defects" not in b and b["label"] is None
    # With an image threshold the label follows the score.
    assert main([*base, "--out", str(tmp_path / "it"), "--image-threshold", "0.95"]) == 0
    for r in _recs(tmp_path / "it"):
        assert r["label"] == int(r["score"] >= np.float32(0.95))


def test_floats_are_shortest_float32_text(tmp_path):
    d = tmp_path / "maps"
    d.mkdir()
    a = np.full((6, 6), 0.1, np.float32)
    a[2:4, 2:4] = np.float32(0.9)
    np.save(d / "a.npy", a)
    out = tmp_path / "out"
    assert main(["run", "--maps", str(d), "--out", str(out), "--pixel-threshold", "0.5"]) == 0
    text = (out / "results.jsonl").read_text()
    assert '"score_max":0.9' in text and "0.8999999761581421" not in text
    r = json.loads(text)["defects"]["regions"][0]
    assert np.float32(r["score_max"]) == np.float32(0.9)  # reads back to the same float32


def test_save_masks_dir_overlays_dir_mask_format_and_infer_config(tmp_path):
    _maps(tmp_path / "maps", 3)
    cfg = tmp_path / "infer_config.json"
    cfg.write_text(json.dumps({"defects": {"pixel_threshold": 0.6, "mask_format": "npz"}}))
    masks, overlays = tmp_path / "m", tmp_path / "o"
    args = ["run", "--maps", str(tmp_path / "maps"), "--out", str(tmp_path / "out"), "--quiet",
            "--infer-config", str(cfg), "--save-masks", str(masks), "--mask-format", "npy",
            "--save-overlays", str(overlays), "--defects-mask-space", "roi"]  # fmt: skip
    assert main(args) == 0
    recs = _recs(tmp_path / "out")
    for r in recs:
        blk = r["defects"]["mask"]
        assert set(blk) == {"path", "shape", "dtype", "encoding", "space", "mask_space"}
        assert blk["mask_space"] == "roi"
        assert os.path.isabs(blk["path"]) and blk["path"].startswith(str(masks))
        assert blk["encoding"] == "npy_uint8_0_255" and blk["dtype"] == "uint8"
        saved = np.load(blk["path"])
        assert saved.shape == tuple(blk["shape"]) and saved.dtype == np.uint8
        assert set(np.unique(saved)) <= {0, 255}
        assert r["defects"]["pixel_threshold_provenance"]["source"] == "infer_config"
    assert len(os.listdir(masks)) == 3 and len(os.listdir(overlays)) == 3
    # --save-masks with no value: the config's format (npz) under OUT/masks
    args2 = ["run", "--maps", str(tmp_path / "maps"), "--out", str(tmp_path / "o2"), "--quiet",
             "--config", str(cfg), "--save-masks", "--save-overlays"]  # fmt: skip
    assert main(args2) == 0
    assert _recs(tmp_path / "o2")[0]["defects"]["mask"]["path"].startswith("masks/")
    assert _recs(tmp_path / "o2")[0]["defects"]["mask"]["encoding"] == "npz_uint8_0_255"
    assert len(os.listdir(tmp_path / "o2" / "overlays")) == 3


def test_train_dir_calibrates_inline_like_numpy_quantile(tmp_path, capsys):
    normal = tmp_path / "normal"
    normal.mkdir()
    rng = np.random.default_rng(5)
    arrays = [rng.random((10, 12), dtype=np.float32) * 0.7 for _ in range(5)]
    for i, a in enumerate(arrays):
        np.save(normal / f"n{i}.npy", a)
    _maps(tmp_path / "maps", 3)
    args = ["run", "--maps", str(tmp_path / "maps"), "--out", str(tmp_path / "out"), "--quiet",
            "--pixel-threshold-strategy", "normal_pixel_quantile", "--pixel-normal-quantile",
            "0.99", "--train-dir", str(normal), "--roi-xyxy-norm", "0", "0", "0.5",
            "1"]  # fmt: skip
    assert main(args) == 0
    roi = np.concatenate([a[:, :6].ravel() for a in arrays]).astype(np.float64)
    want = float(np.quantile(roi, 0.99))
    for r in _recs(tmp_path / "out"):
        d = r["defects"]
        assert d["pixel_threshold"] == want
        prov = d["pixel_threshold_provenance"]
        assert prov["source"] == "train_dir" and prov["method"] == "normal_pixel_quantile"
        assert prov["q"] == 0.99 and prov["calibration_map_count"] == 5
    # The same inline calibration resumes (created_at is not a setting).
    assert main([*args, "--resume"]) == 0
    # Strategy errors are usage errors, before any file.
    for extra, msg in (
        (["--pixel-threshold-strategy", "fixed"], "fixed needs --pixel-threshold"),
        (["--pixel-threshold-strategy", "infer_config"], "the config has none"),
        (["--pixel-threshold", "0.5", "--train-dir", str(normal)], "exclude each other"),
    ):
        capsys.readouterr()
        a = ["run", "--maps", str(tmp_path / "maps"), "--out", str(tmp_path / "x"), *extra]
        assert main(a) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_run_help_groups_pyimgano_flags(capsys):
    from torchdefects.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    group = text.split("pyimgano-compatible:")[1].split("\n\n")[0]
    for flag in ("--defects", "--pixel-threshold-strategy", "--pixel-normal-quantile",
                 "--train-dir", "--save-masks", "--mask-format", "--save-overlays",
                 "--defects-mask-space"):  # fmt: skip
        assert flag in group, flag
    assert "--config FILE, --infer-config FILE" in text


def test_docs_cli_table_matches_the_parser():
    from torchdefects._fields import flags_table
    from torchdefects.batch import RunOptions

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "docs", "cli.md"), encoding="utf-8") as f:
        doc = f.read()
    assert flags_table([RunOptions, DefectsConfig]) in doc, (
        "regenerate: python -m torchdefects._fields"
    )


def test_config_enabled_false_turns_defects_off(tmp_path, monkeypatch):
    # The config's defects.enabled (pyimgano) arrives with the config issue as a field;
    # until then a class attribute stands in for it.
    _maps(tmp_path / "maps", 2)
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"defects": {"pixel_threshold": 0.6}}))
    if not any(f.name == "enabled" for f in dataclasses.fields(DefectsConfig)):
        monkeypatch.setattr(DefectsConfig, "enabled", False, raising=False)
    else:
        cfg_file.write_text(json.dumps({"defects": {"pixel_threshold": 0.6, "enabled": False}}))
    out = tmp_path / "out"
    assert main(["run", "--maps", str(tmp_path / "maps"), "--out", str(out), "--config",
                 str(cfg_file), "--quiet"]) == 0  # fmt: skip
    assert all("defects" not in r for r in _recs(out))
    # --defects wins over the config
    assert main(["run", "--maps", str(tmp_path / "maps"), "--out", str(out), "--config",
                 str(cfg_file), "--defects", "--overwrite", "--quiet"]) == 0  # fmt: skip
    assert all("defects" in r for r in _recs(out))


def test_train_dir_of_images_calibrates_through_the_detector(tmp_path):
    from PIL import Image

    det = torch.jit.script(_Det())
    det_path = str(tmp_path / "det.pt")
    torch.jit.save(det, det_path)
    rng = np.random.default_rng(2)
    xs = []
    for folder, n in (("normal", 4), ("test", 2)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            img = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / folder / f"{i}.png")
            if folder == "normal":
                xs.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255.0)
    args = ["run", "--images", str(tmp_path / "test"), "--detector", det_path, "--map-output",
            "1", "--out", str(tmp_path / "out"), "--train-dir", str(tmp_path / "normal"),
            "--pixel-normal-quantile", "0.9", "--quiet"]  # fmt: skip
    assert main(args) == 0
    with torch.no_grad():  # one image at a time, as the run feeds the calibrator
        maps = torch.cat([det(x[None])[1] for x in xs])
    want = float(np.quantile(maps.numpy().astype(np.float64), 0.9))
    for r in _recs(tmp_path / "out"):
        assert r["defects"]["pixel_threshold"] == want
        assert r["defects"]["pixel_threshold_provenance"]["source"] == "train_dir"


def test_report_flag_writes_report_html(tmp_path):
    """--report: OUT/report.html with one row per input, NG first, overlays linked."""
    from html.parser import HTMLParser

    _maps(tmp_path / "maps", 3)
    out = tmp_path / "out"
    args = ["run", "--maps", str(tmp_path / "maps"), "--out", str(out), "--quiet",
            "--pixel-threshold", "0.5", "--save-overlays", "--report"]  # fmt: skip
    assert main(args) == 0
    rows, links = [], []

    class Page(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "tr" and "data-status" in a:
                rows.append(a)
            if tag == "a" and a.get("href", "").startswith("overlays/"):
                links.append(a["href"])

    Page().feed((out / "report.html").read_text())
    assert len(rows) == 3
    assert links and all((out / h).is_file() for h in links)


def test_save_maps_then_calibrate_from_images(tmp_path, capsys):
    """run --save-maps npy keeps the detector's maps; calibrate --images --detector gives
    the threshold numpy.quantile gives on those same maps, and prints the normal quantiles."""
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(imgs / f"{i}.png")

    class Det(torch.nn.Module):
        def forward(self, x):
            return {"map": x.mean(1, keepdim=True) ** 2, "score": x.amax((1, 2, 3))}

    det = tmp_path / "det.pt"
    torch.jit.save(torch.jit.script(Det()), str(det))
    out = tmp_path / "out"
    args = ["run", "--images", str(imgs), "--detector", str(det), "--map-output", "map",
            "--out", str(out), "--quiet", "--pixel-threshold", "0.5",
            "--save-maps", "npy"]  # fmt: skip
    assert main(args) == 0
    recs = _recs(out)
    kept = [np.load(out / r["anomaly_map"]["path"]) for r in recs]
    assert all(k.dtype == np.float32 and k.shape == (12, 10) for k in kept)
    cfg = tmp_path / "cfg.json"
    args = ["calibrate", "--images", str(imgs), "--detector", str(det), "--map-output", "map",
            "--q", "0.9", "-o", str(cfg)]  # fmt: skip
    assert main(args) == 0
    expected = np.quantile(np.concatenate([k.ravel() for k in kept]).astype(np.float64), 0.9)
    assert load_config(str(cfg)).pixel_threshold == expected
    err = capsys.readouterr().err
    assert "normal pixels:" in err and "q0.99=" in err and "max=" in err
    bad = ["calibrate", "--images", str(imgs), "-o", str(cfg)]
    assert main(bad) == 2
    assert "--images needs --detector" in capsys.readouterr().err


def test_detector_image_score_is_recorded(tmp_path):
    """A detector with anomalib's pred_score: records carry its score, the head's label."""
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(6)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(imgs / f"{i}.png")

    class Det(torch.nn.Module):
        def forward(self, x):
            return {"anomaly_map": x.mean(1, keepdim=True), "pred_score": x.mean((1, 2, 3)) * 3}

    det = tmp_path / "det.pt"
    torch.jit.save(torch.jit.script(Det()), str(det))
    out = tmp_path / "out"
    args = ["run", "--images", str(imgs), "--detector", str(det), "--map-output", "anomaly_map",
            "--out", str(out), "--quiet", "--pixel-threshold", "2.0",
            "--image-threshold", "1.5"]  # fmt: skip
    assert main(args) == 0
    for r in _recs(out):
        u8 = torch.from_numpy(np.asarray(Image.open(r["input"])).copy())
        x = u8.permute(2, 0, 1)[None].float() / 255.0  # the runner's image tensor
        want = np.float32(Det()(x)["pred_score"][0].item())
        assert r["score_source"] == "detector"
        # Batched and single-image means may round differently in the last bit.
        assert np.isclose(np.float32(r["score"]), want, rtol=2e-7, atol=0)
        assert r["label"] == int(want >= np.float32(1.5))


def test_max_pixels_cap_is_an_error_record(tmp_path, capsys):
    """--max-pixels: a map over the cap is an error record (too_large); the rest run."""
    d = tmp_path / "maps"
    d.mkdir()
    np.save(d / "small.npy", np.zeros((4, 4), np.float32))
    np.save(d / "big.npy", np.zeros((8, 8), np.float32))
    out = tmp_path / "out"
    args = ["run", "--maps", str(d), "--out", str(out), "--quiet", "--pixel-threshold", "0.5",
            "--max-pixels", "20"]  # fmt: skip
    assert main(args) == 3
    recs = {os.path.basename(r["input"]): r for r in _recs(out)}
    assert recs["big.npy"]["error"]["type"] == "too_large"
    assert "defects" in recs["small.npy"]
    assert main([*args[:-1], "0", "--overwrite"]) == 2
    assert "--max-pixels must be >= 1, got 0" in capsys.readouterr().err


def test_exported_detector_and_head_round_trip(tmp_path, capsys):
    """export --detector keeps the detector's preprocess.json and its outputs carry no
    grad_fn; run --detector on the exported file uses its embedded config, and settings
    passed beside it are a usage error."""
    from PIL import Image

    from torchdefects.export import PREPROCESS_EXTRA_FILE, load_scripted

    class Det(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))  # requires grad

        def forward(self, x):
            return {"anomaly_map": x.mean(1, keepdim=True) * self.w}

    det_path = tmp_path / "det.pt"
    prep = {"input_size": [12, 10], "mean": None, "std": None, "center_crop": False}
    torch.jit.save(torch.jit.script(Det()), str(det_path),
                   _extra_files={PREPROCESS_EXTRA_FILE: json.dumps(prep)})  # fmt: skip
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"defects": {"pixel_threshold": 0.6, "min_area": 2}}))
    exported = tmp_path / "full.pt"
    assert main(["export", "--config", str(cfg), "--detector", str(det_path),
                 "--map-output", "anomaly_map", "-o", str(exported)]) == 0  # fmt: skip
    extra = {PREPROCESS_EXTRA_FILE: ""}
    model = torch.jit.load(str(exported), _extra_files=extra)
    assert json.loads(extra[PREPROCESS_EXTRA_FILE]) == prep
    out = model(torch.rand(2, 3, 12, 10))
    assert all(not t.requires_grad for t in (out.mask, out.regions.score_max, out.image_score))
    assert load_scripted(str(exported))[1]["config"]["pixel_threshold"] == 0.6

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(7)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    run = ["run", "--images", str(imgs), "--detector", str(exported), "--out",
           str(tmp_path / "o1"), "--quiet"]  # fmt: skip
    assert main(run) == 0
    recs = _recs(tmp_path / "o1")
    assert [r["defects"]["pixel_threshold"] for r in recs] == [0.6, 0.6]
    assert recs[0]["defects"]["space"]["to_image"]["image_size"] == [24, 20]  # resized to 12x10
    assert recs[0]["anomaly_map"]["shape"] == [12, 10]
    bad = [*run[:-2], str(tmp_path / "o2"), "--quiet", "--pixel-threshold", "0.3"]
    assert main(bad) == 2
    assert "already holds a DefectHead" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
