"""torchdefects.report: the HTML page parsed back (html.parser), and once in a real browser."""

import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from torchdefects.report import write_report


class _Page(HTMLParser):
    """Rows of the results table, every link/src, the scripts and the text."""

    def __init__(self):
        super().__init__()
        self.rows = []  # (attrs of <tr>, [cell texts], [cell data-v])
        self.links = []
        self.scripts = []
        self.external = []  # <link>, <script src>, <iframe> ...
        self.headers = []
        self.imgs = []
        self.errors = []
        self._in = {"results": False, "tbody": False, "script": False, "errors": False}
        self._row = None
        self._cell = None
        self._li = None
        self.body = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "table" and a.get("id") == "results":
            self._in["results"] = True
        if tag == "section" and a.get("id") == "errors":
            self._in["errors"] = True
        if tag == "tbody" and self._in["results"]:
            self._in["tbody"] = True
        if tag == "th" and self._in["results"]:
            self.headers.append(a)
        if tag == "tr" and self._in["tbody"]:
            self._row = (a, [], [])
        if tag == "td" and self._row is not None:
            self._cell = []
            self._row[2].append(a.get("data-v"))
        if tag == "li" and self._in["errors"]:
            self._li = []
        if tag == "img":
            self.imgs.append(a.get("src"))
        for key in ("href", "src"):
            if key in a:
                self.links.append(a[key])
        if tag in ("link", "iframe", "object", "embed") or (tag == "script" and "src" in a):
            self.external.append(tag)
        if tag == "script":
            self._in["script"] = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        if tag == "tbody":
            self._in["tbody"] = False
        if tag == "table":
            self._in["results"] = False
        if tag == "li" and self._li is not None:
            self.errors.append("".join(self._li))
            self._li = None
        if tag == "section":
            self._in["errors"] = False
        if tag == "script":
            self._in["script"] = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._li is not None:
            self._li.append(data)
        if self._in["script"]:
            self.scripts[-1] += data


def _parse(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    p = _Page()
    p.feed(text)
    return p, text


def _png(path, size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros(size + (3,), np.uint8)).save(path)


def _ok_rec(inp, regions=(), threshold=0.5, score_max=None, mask=None, **extra):
    regs = [
        {
            "id": 10 + i,
            "bbox_xyxy": [1, 2, 3, 4],
            "area": a,
            "centroid_xy": [2.0, 3.0],
            "score_max": s,
            "score_mean": s / 2,
        }
        for i, (s, a) in enumerate(regions)
    ]
    return {
        "input": inp,
        "anomaly_map": {"shape": [8, 8]},
        "image_size": None,
        "defects": {
            "space": {"type": "anomaly_map", "shape": [8, 8]},
            "pixel_threshold": threshold,
            "pixel_threshold_provenance": {
                "source": "infer_config",
                "method": "fixed",
                "value": threshold,
                "path": "cfg.json",
                "stored_provenance": {
                    "source": "train_dir",
                    "method": "normal_pixel_quantile",
                    "q": 0.999,
                    "calibration_map_count": 4,
                    "calibration_pixel_count": 1024,
                    "normal_min": 0.01,
                    "normal_max": 0.52,
                    "normal_quantiles": {"0.99": 0.3, "0.999": 0.5, "0.9999": None},
                },
            },
            "map_stats_roi": {"max": score_max, "mean": 0.1},
            "mask": mask,
            "regions": regs,
        },
        **extra,
    }


def _make_run(out, torn=True):
    """A run folder with the runner's layout: NG, OK, errors, odd names, a torn last line."""
    recs = [
        _ok_rec(
            "maps/a/img.npy",
            [(0.9, 12), (0.7, 30)],
            score_max=0.9,
            mask={
                "path": "masks/a/img.npy.png",
                "encoding": "png_0_255",
                "shape": [8, 8],
                "space": "anomaly_map",
            },
        ),
        _ok_rec("maps/ok one.npy", [], score_max=0.2),
        {
            "input": "maps/broken.npy",
            "error": {"type": "unreadable", "message": "bad <b>bytes</b>"},
        },
        _ok_rec("maps/c d/x#1?.npy", [(2.5, 4)], score_max=2.5),
        _ok_rec("maps/labelled.npy", [], score_max=0.4, index=4, score=0.45, label=1),
        {"input": "maps/nan.npy", "error": {"type": "nan_map", "message": "3 NaN pixels"}},
        _ok_rec("maps/zero.npy", [], score_max=0.0),
    ]
    os.makedirs(out, exist_ok=True)
    _png(os.path.join(out, "masks", "a", "img.npy.png"))
    for name in ("a/img.npy", "ok one.npy", "c d/x#1?.npy", "labelled.npy", "zero.npy"):
        _png(os.path.join(out, "overlays", name + ".png"))
    with open(os.path.join(out, "results.jsonl"), "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
        if torn:
            f.write('{"input": "maps/cut.npy", "defe')
    return recs


def _check_links(out, page, text):
    assert "http://" not in text and "https://" not in text and "//" not in "".join(page.links)
    assert page.external == []
    for link in page.links:
        assert urllib.parse.urlparse(link).scheme == ""
        rel = urllib.parse.unquote(link)
        assert not os.path.isabs(rel) and ".." not in rel.split("/")
        assert os.path.isfile(os.path.join(out, *rel.split("/"))), link


def test_report_structure(tmp_path):
    out = str(tmp_path / "run")
    recs = _make_run(out)
    path = write_report(out)
    assert path == os.path.join(out, "report.html")
    page, text = _parse(path)
    # One row per record (the torn last line is reported, not a row).
    assert len(page.rows) == len(recs)
    status = [r[0]["data-status"] for r in page.rows]
    assert sorted(status) == sorted(["NG", "OK", "ERROR", "NG", "NG", "ERROR", "OK"])
    # Worst first: NG by score, then errors, then OK by score.
    assert status == ["NG", "NG", "NG", "ERROR", "ERROR", "OK", "OK"]
    inputs = [r[1][2] for r in page.rows]
    assert inputs[0].startswith("maps/c d/x#1?.npy") and inputs[1].startswith("maps/a/img.npy")
    assert inputs[2].startswith("maps/labelled.npy")  # label=1 makes it NG without a region
    # Index from the record when present, else the line number - 1.
    assert [r[1][0] for r in page.rows][:3] == ["3", "0", "4"]
    # The score column: the record's score, else the map's ROI max.
    assert page.rows[2][2][4] == "0.45" and page.rows[0][2][4] == "2.5"
    # Every record with an overlay links it; every link resolves inside OUT.
    _check_links(out, page, text)
    assert sum(1 for link in page.links if link.startswith("overlays/")) == 2 * 5
    assert "masks/a/img.npy.png" in page.links
    # Sorting and filtering script, sortable headers, filter buttons.
    assert len(page.scripts) == 1 and "sortBy" in page.scripts[0] and "data-filter" in text
    keys = {h.get("data-key"): h.get("data-type") for h in page.headers}
    assert keys["score"] == "num" and keys["input"] == "text" and keys["regions"] == "num"
    for f in ("all", "NG", "ERROR", "OK"):
        assert f"data-filter='{f}'" in text
    # Errors listed with their messages (escaped), the summary, the threshold provenance.
    assert len(page.errors) == 2 and "bad <b>bytes</b>" in page.errors[0]
    assert "&lt;b&gt;bytes" in text and "<b>bytes" not in text
    assert "torn last line" in text
    assert "from the config cfg.json; calibrated: normal_pixel_quantile q=0.999 over 4" in text
    assert "normal pixels at calibration: min 0.01, q0.99 0.3, q0.999 0.5, max 0.52" in text
    assert "no manifest.json" in text
    # Thumbnails capped: the first row shows its picture, the others link to theirs.
    page, text = _parse(write_report(out, max_thumbnails=1))
    assert page.imgs == ["overlays/c%20d/x%231%3F.npy.png"]  # the first row's, escaped
    assert sum(1 for link in page.links if link.startswith("overlays/")) == 1 + 5


def test_manifest_settings_and_bad_manifest(tmp_path):
    out = str(tmp_path / "run")
    _make_run(out, torn=False)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"settings": {"min_area": 12, "open_ksize": 3}, "inputs": 7}, f)
    page, text = _parse(write_report(out, title="Line 3 <night>"))
    assert "min_area" in text and "open_ksize" in text and "the whole manifest.json" in text
    assert "<title>Line 3 &lt;night&gt;</title>" in text
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write("{not json")
    page, text = _parse(write_report(out))
    assert "manifest.json could not be read" in text and len(page.rows) == 7


def test_large_run_is_capped_and_says_so(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    rng = np.random.default_rng(0)
    scores = rng.random(200)
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for i, s in enumerate(scores):
            regs = [(float(s), 5)] if s > 0.9 else []
            f.write(json.dumps(_ok_rec(f"m{i}.npy", regs, score_max=float(s))) + "\n")
    page, text = _parse(write_report(out, max_rows=30))
    assert len(page.rows) == 30
    assert "the table holds 30 of 200 records" in text
    n_ng = int((scores > 0.9).sum())
    # Kept: every NG, then the OK rows with the highest scores.
    got = [float(r[2][4]) for r in page.rows]
    want = sorted(scores[scores > 0.9], reverse=True) + sorted(scores[scores <= 0.9], reverse=True)
    np.testing.assert_allclose(got, want[:30], rtol=1e-12)
    assert [r[0]["data-status"] for r in page.rows].count("NG") == n_ng
    assert "<div class='n'>200</div>" in text


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"out_dir has no results\.jsonl"):
        write_report(str(tmp_path))
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(ValueError, match="max_rows must be a positive integer, got 0"):
        write_report(str(tmp_path), max_rows=0)
    page, text = _parse(write_report(str(tmp_path)))
    assert page.rows == [] and "holds no record" in text


def test_report_of_a_real_run(tmp_path):
    from torchdefects.batch import RunOptions
    from torchdefects.batch import run_folder as run

    maps = tmp_path / "maps"
    (maps / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        m = rng.random((16, 20)).astype(np.float32) * 0.5
        if i % 2:
            m[4:8, 5:9] = 2.0 + i
        np.save(maps / ("sub" if i == 3 else "") / f"m{i}.npy", m)
    (maps / "bad.npy").write_bytes(b"not a npy")
    out = str(tmp_path / "out")
    run(
        RunOptions(
            out=out,
            maps=str(maps),
            pixel_threshold=1.0,
            save_masks="png",
            save_overlays=True,
            quiet=True,
        )
    )
    page, text = _parse(write_report(out))
    with open(os.path.join(out, "results.jsonl")) as f:
        n = sum(1 for line in f if line.strip())
    assert len(page.rows) == n == 6
    _check_links(out, page, text)
    overlays = [link for link in page.links if link.startswith("overlays/")]
    assert len(overlays) == 2 * 5  # thumbnail and link for each readable map
    assert [r[0]["data-status"] for r in page.rows].count("NG") == 2
    assert len(page.errors) == 1 and "bad.npy" in page.errors[0]


_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_in_a_headless_browser(tmp_path):
    out = str(tmp_path / "run")
    _make_run(out, torn=False)
    path = write_report(out)
    url = "file://" + urllib.parse.quote(os.path.abspath(path)) + "#filter=NG&sort=score&dir=asc"
    profile = tempfile.mkdtemp()
    try:
        dom = subprocess.run(
            [
                _CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    page = _Page()
    page.feed(dom)
    assert page.body.get("data-ready") == "1"  # the script ran to its end
    shown = [r for r in page.rows if "hidden" not in r[0]]
    assert [r[0]["data-status"] for r in shown] == ["NG", "NG", "NG"]
    assert all(r[0]["data-status"] != "NG" for r in page.rows if "hidden" in r[0])
    scores = [float(r[2][4]) for r in shown]
    assert scores == sorted(scores) == [0.45, 0.9, 2.5]
    assert "3 of 7 rows shown" in dom


def test_provenance_sentences():
    from torchdefects.report import _provenance_line

    assert _provenance_line({"source": "explicit", "method": "fixed", "value": 1.0}) == (
        "given explicitly"
    )
    calib = {
        "source": "train_dir",
        "method": "normal_pixel_quantile",
        "q": 0.99,
        "calibration_map_count": 3,
        "calibration_pixel_count": 12000,
    }
    assert _provenance_line(calib) == (
        "calibrated: normal_pixel_quantile q=0.99 over 3 normal maps (12,000 pixels)"
    )
    # Records written before the pyimgano vocabulary read the same.
    old = {
        "source": "config",
        "path": "c.json",
        "stored_provenance": {**calib, "source": "calibration"},
    }
    assert _provenance_line(old) == "from the config c.json; " + _provenance_line(calib)
    assert _provenance_line(None) == "provenance not recorded"


def test_report_names_severity(tmp_path):
    """A run with severity rules: the verdict cell names the image's class and the region
    list each region's (escaped); a run without rules shows neither."""
    from torchdefects.batch import RunOptions
    from torchdefects.batch import run_folder as run

    maps = tmp_path / "maps"
    maps.mkdir()
    m = np.zeros((16, 20), np.float32)
    m[2:8, 2:9] = 0.9
    m[12, 15] = 0.7
    np.save(maps / "a.npy", m)
    rules = [{"name": "<big>", "min_area": 20}, {"name": "minor", "min_score_max": 0.8}]
    for sub, overrides in (("with", {"severity_rules": rules}), ("without", {})):
        out = str(tmp_path / sub)
        run(RunOptions(out=out, maps=str(maps), pixel_threshold=0.5, quiet=True,
                       overrides=overrides))  # fmt: skip
        with open(write_report(out), encoding="utf-8") as f:
            html_text = f.read()
        page, _ = _parse(write_report(out))
        assert len(page.rows) == 1
        if sub == "with":
            assert "<span class='muted'>&lt;big&gt;</span>" in html_text
            assert "1: &lt;big&gt; 0.9, 42 px at [2, 2, 8, 7]" in html_text
            assert "2: 0.7, 1 px at [15, 12, 15, 12]" in html_text  # no class: no name
        else:
            assert "&lt;big&gt;" not in html_text and "1: 0.9, 42 px" in html_text
