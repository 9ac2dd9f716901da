import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from torchdefects import files as tio


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _maps(tmp_path):
    rng = np.random.default_rng(0)
    return rng.random((6, 7)).astype(np.float32)


# ----------------------------------------------------------------------------
# list_inputs
# ----------------------------------------------------------------------------


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")


def test_list_inputs_directory_recursive_sorted(tmp_path):
    for rel in ["b/2.npy", "a/1.npy", "a/z/0.NPY", "c.txt", ".hidden/x.npy", "a/.y.npy"]:
        _touch(str(tmp_path / rel))
    got = tio.list_inputs(str(tmp_path), (".npy",))
    want = sorted(str(tmp_path / r) for r in ["a/1.npy", "a/z/0.NPY", "b/2.npy"])
    assert got == want
    assert tio.list_inputs(str(tmp_path), None) == sorted(want + [str(tmp_path / "c.txt")])


def test_list_inputs_glob_and_file(tmp_path):
    for rel in ["a/1.npy", "a/2.npz", "b/3.npy"]:
        _touch(str(tmp_path / rel))
    got = tio.list_inputs(str(tmp_path / "**" / "*.npy"))
    assert got == [str(tmp_path / "a/1.npy"), str(tmp_path / "b/3.npy")]
    assert tio.input_root(str(tmp_path / "**" / "*.npy")) == str(tmp_path)
    assert tio.list_inputs(str(tmp_path / "a/2.npz")) == [str(tmp_path / "a/2.npz")]
    assert tio.input_root(str(tmp_path)) == str(tmp_path)


def test_list_inputs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tio.list_inputs(str(tmp_path / "nope"))
    _touch(str(tmp_path / "a.txt"))
    with pytest.raises(FileNotFoundError, match=r"no files matching .* with extensions \.npy"):
        tio.list_inputs(str(tmp_path), (".npy",))
    with pytest.raises(FileNotFoundError, match="no files matching"):
        tio.list_inputs(str(tmp_path / "*.npy"))


# ----------------------------------------------------------------------------
# read_map
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 7), (1, 6, 7), (1, 1, 6, 7)])
def test_read_map_npy_shapes(tmp_path, shape):
    a = np.random.default_rng(1).random(shape)  # float64 on purpose
    p = str(tmp_path / "m.npy")
    np.save(p, a)
    got = tio.read_map(p)
    assert got.dtype == np.float32 and got.shape == (6, 7)
    np.testing.assert_array_equal(got, a.reshape(6, 7).astype(np.float32))


def test_read_map_npz(tmp_path):
    a = _maps(tmp_path)
    p1 = str(tmp_path / "one.npz")
    np.savez(p1, whatever=a)
    np.testing.assert_array_equal(tio.read_map(p1), a)
    p2 = str(tmp_path / "keyed.npz")
    np.savez(p2, image=np.zeros((2, 2)), anomaly_map=a)
    np.testing.assert_array_equal(tio.read_map(p2), a)
    p3 = str(tmp_path / "map.npz")
    np.savez(p3, image=np.zeros((2, 2)), map=a)
    np.testing.assert_array_equal(tio.read_map(p3), a)
    p4 = str(tmp_path / "two.npz")
    np.savez(p4, x=a, y=a)
    with pytest.raises(
        ValueError, match=r"two\.npz.*2 arrays \('x', 'y'\).*'anomaly_map' or 'map'"
    ):
        tio.read_map(p4)


def test_read_map_pt(tmp_path):
    t = torch.rand(1, 1, 6, 7, dtype=torch.float64)
    p = str(tmp_path / "m.pt")
    torch.save(t, p)
    np.testing.assert_array_equal(tio.read_map(p), t[0, 0].float().numpy())
    p2 = str(tmp_path / "d.pt")
    torch.save({"anomaly_map": t[0], "other": torch.zeros(2)}, p2)
    np.testing.assert_array_equal(tio.read_map(p2), t[0, 0].float().numpy())
    p3 = str(tmp_path / "list.pt")
    torch.save([1, 2], p3)
    with pytest.raises(ValueError, match=r"list\.pt: expected a saved tensor, got list"):
        tio.read_map(p3)


def test_read_map_pt_refuses_pickled_objects(tmp_path):
    import datetime

    p = str(tmp_path / "evil.pt")
    torch.save({"x": datetime.date(2020, 1, 1)}, p)
    with pytest.raises(ValueError, match=r"evil\.pt: cannot read map"):
        tio.read_map(p)


def test_read_map_png_keeps_raw_values(tmp_path):
    a8 = np.arange(42, dtype=np.uint8).reshape(6, 7) * 6
    p8 = str(tmp_path / "m8.png")
    Image.fromarray(a8, mode="L").save(p8)
    np.testing.assert_array_equal(tio.read_map(p8), a8.astype(np.float32))
    a16 = (np.arange(42, dtype=np.uint16).reshape(6, 7) * 1500).astype(np.uint16)
    p16 = str(tmp_path / "m16.png")
    Image.fromarray(a16).save(p16)
    got = tio.read_map(p16)
    assert got.max() == 41 * 1500
    np.testing.assert_array_equal(got, a16.astype(np.float32))


def test_read_map_float_tiff(tmp_path):
    a = _maps(tmp_path) * 3 - 1
    p = str(tmp_path / "m.tif")
    Image.fromarray(a, mode="F").save(p)
    np.testing.assert_array_equal(tio.read_map(p), a)


def test_read_map_errors(tmp_path):
    p = str(tmp_path / "bad_shape.npy")
    np.save(p, np.zeros((2, 6, 7)))
    with pytest.raises(ValueError, match=r"bad_shape\.npy: map must have shape .* got \[2, 6, 7\]"):
        tio.read_map(p)
    p = str(tmp_path / "empty.npy")
    np.save(p, np.zeros((0, 7)))
    with pytest.raises(ValueError, match=r"empty\.npy: map is empty"):
        tio.read_map(p)
    p = str(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(p)
    with pytest.raises(ValueError, match=r"rgb\.png: map must have shape .* got \[4, 5, 3\]"):
        tio.read_map(p)
    p = str(tmp_path / "junk.npy")
    with open(p, "wb") as f:
        f.write(b"not numpy")
    with pytest.raises(ValueError, match=r"junk\.npy: cannot read map"):
        tio.read_map(p)
    p = str(tmp_path / "bool.npy")
    np.save(p, np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="real numbers"):
        tio.read_map(p)
    p = str(tmp_path / "m.jpg")
    _touch(p)
    with pytest.raises(ValueError, match=r"unsupported map extension '\.jpg'"):
        tio.read_map(p)
    with pytest.raises(FileNotFoundError, match=r"missing\.npy"):
        tio.read_map(str(tmp_path / "missing.npy"))


def test_read_image(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    p = str(tmp_path / "i.png")
    Image.fromarray(rgb).save(p)
    got = tio.read_image(p)
    assert got.dtype == np.uint8 and got.shape == (5, 6, 3)
    np.testing.assert_array_equal(got, rgb)
    gray = rgb[:, :, 0]
    Image.fromarray(gray, mode="L").save(p)
    np.testing.assert_array_equal(tio.read_image(p), np.repeat(gray[:, :, None], 3, 2))
    g16 = np.full((2, 3), 65535, np.uint16)
    Image.fromarray(g16).save(p)
    assert (tio.read_image(p) == 255).all()
    bad = str(tmp_path / "bad.png")
    _touch(bad)
    with pytest.raises(ValueError, match=r"bad\.png: cannot read image"):
        tio.read_image(bad)


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = str(tmp_path / "sub" / "f.bin")
    tio.atomic_write_bytes(p, b"one")
    tio.atomic_write_bytes(p, b"two")
    assert _read(p) == b"two"
    assert os.listdir(tmp_path / "sub") == ["f.bin"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    p = str(tmp_path / "f.json")
    tio.atomic_write_json(p, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        tio.atomic_write_json(p, {"a": 2})
    monkeypatch.undo()
    assert json.loads(_read(p)) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_atomic_write_json_nan_becomes_null(tmp_path):
    p = str(tmp_path / "f.json")
    tio.atomic_write_json(p, {"x": float("nan"), "y": (1.5, float("inf")), "z": np.float32(2)})
    assert json.loads(_read(p)) == {"x": None, "y": [1.5, None], "z": 2.0}


@pytest.mark.parametrize(
    "fmt,encoding", [("png", "png_0_255"), ("npy", "npy_bool"), ("npz", "npz_bool")]
)
def test_write_mask_formats(tmp_path, fmt, encoding):
    m = np.random.default_rng(3).random((5, 7)) > 0.5
    p = str(tmp_path / ("m" + tio.MASK_EXTENSIONS[fmt]))
    assert tio.write_mask(p, m, fmt) == encoding
    if fmt == "png":
        with Image.open(p) as img:
            assert img.mode == "L"
            a = np.asarray(img)
        assert set(np.unique(a)) <= {0, 255}
        np.testing.assert_array_equal(a == 255, m)
    elif fmt == "npy":
        a = np.load(p)
        assert a.dtype == np.bool_
        np.testing.assert_array_equal(a, m)
    else:
        with np.load(p) as z:
            assert z.files == ["mask"]
            assert z["mask"].dtype == np.bool_
            np.testing.assert_array_equal(z["mask"], m)


def test_write_mask_accepts_tensor_and_rejects_bad(tmp_path):
    m = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    m[0, 0, 1, 2] = True
    p = str(tmp_path / "m.npy")
    tio.write_mask(p, m, "npy")
    np.testing.assert_array_equal(np.load(p), m[0, 0].numpy())
    with pytest.raises(ValueError, match="mask_format must be one of png, npy, npz, got 'jpg'"):
        tio.write_mask(p, m, "jpg")
    with pytest.raises(ValueError, match=r"mask must have shape \(H, W\), got \[2, 3, 4\]"):
        tio.write_mask(p, np.zeros((2, 3, 4), bool), "npy")
    with pytest.raises(ValueError, match="only 0 and 1"):
        tio.write_mask(p, np.full((2, 2), 0.5), "npy")


# ----------------------------------------------------------------------------
# JSONL
# ----------------------------------------------------------------------------


def test_jsonl_roundtrip_and_nan(tmp_path):
    p = str(tmp_path / "r.jsonl")
    with tio.JsonlWriter(p) as w:
        w.write({"a": float("nan"), "b": np.float32(0.5), "t": torch.tensor([1, 2])})
        # flushed per call: readable before close
        assert tio.read_jsonl(p).records == [{"a": None, "b": 0.5, "t": [1, 2]}]
        w.write({"c": [float("-inf")]})
    got = tio.read_jsonl(p)
    assert got.records == [{"a": None, "b": 0.5, "t": [1, 2]}, {"c": [None]}]
    assert got.torn_line is None
    with tio.JsonlWriter(p) as w:  # appends
        w.write({"d": 1})
    assert len(tio.read_jsonl(p).records) == 3


def test_jsonl_torn_last_line(tmp_path):
    p = str(tmp_path / "r.jsonl")
    with open(p, "w") as f:
        f.write('{"a": 1}\n{"b": 2}\n{"c": ')
    got = tio.read_jsonl(p)
    assert got.records == [{"a": 1}, {"b": 2}]
    assert got.torn_line == 3
    w = tio.JsonlWriter(p)
    assert w.truncated_bytes == len('{"c": ')
    w.write({"c": 3})
    w.close()
    assert tio.read_jsonl(p) == ([{"a": 1}, {"b": 2}, {"c": 3}], None)


def test_jsonl_complete_last_line_without_newline_is_kept(tmp_path):
    p = str(tmp_path / "r.jsonl")
    with open(p, "w") as f:
        f.write('{"a": 1}\n\n{"b": 2}')
    assert tio.read_jsonl(p) == ([{"a": 1}, {"b": 2}], None)


def test_jsonl_corrupt_middle_line_raises(tmp_path):
    p = str(tmp_path / "r.jsonl")
    with open(p, "w") as f:
        f.write('{"a": 1}\n{oops\n{"b": 2}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl: line 2 is not valid JSON"):
        tio.read_jsonl(p)


# ----------------------------------------------------------------------------
# Output names
# ----------------------------------------------------------------------------


def test_safe_relative_stem_unique_and_stable(tmp_path):
    root = str(tmp_path)
    paths = [
        "a/img.npy",
        "b/img.npy",
        "img.npy",
        "img.npz",
        "a__img.npy",
        "a b/img.npy",
        "a_b/img.npy",
        "ünï/img.npy",
        ".hidden.npy",
        "hidden.npy",
    ]
    names = [tio.safe_relative_stem(os.path.join(root, p), root) for p in paths]
    assert len(set(names)) == len(names)
    assert names[:5] == ["a/img.npy", "b/img.npy", "img.npy", "img.npz", "a__img.npy"]
    # stable across calls and independent of other inputs
    assert tio.safe_relative_stem(os.path.join(root, "a b/img.npy"), root) == names[5]
    for n in names:
        assert not os.path.isabs(n)
        assert ".." not in n.split("/")
        assert all(c.isascii() for c in n)
        assert not any(part.startswith(".") for part in n.split("/"))
        out = os.path.normpath(os.path.join(root, "out", n))
        assert out.startswith(os.path.join(root, "out") + os.sep)


def test_safe_relative_stem_outside_root(tmp_path):
    with pytest.raises(ValueError, match="not inside the input root"):
        tio.safe_relative_stem(str(tmp_path / "x.npy"), str(tmp_path / "sub"))


def test_safe_relative_stem_long_names(tmp_path):
    root = str(tmp_path)
    a = tio.safe_relative_stem(os.path.join(root, "x" * 300 + "a.npy"), root)
    b = tio.safe_relative_stem(os.path.join(root, "x" * 300 + "b.npy"), root)
    assert a != b and len(a) < 150
