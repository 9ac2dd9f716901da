import json
import os
import warnings

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
    with pytest.raises(ValueError, match=r"rgb\.png: map must have shape .* shape \[4, 5, 3\]"):
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
    "fmt,encoding,name,dtype,on",
    [
        ("png", "uint8", "png_0_255", np.uint8, 255),
        ("npy", "uint8", "npy_uint8_0_255", np.uint8, 255),
        ("npz", "uint8", "npz_uint8_0_255", np.uint8, 255),
        ("npy", "bool", "npy_bool", np.bool_, True),
        ("npz", "bool", "npz_bool", np.bool_, True),
    ],
)
def test_write_mask_formats(tmp_path, fmt, encoding, name, dtype, on):
    m = np.random.default_rng(3).random((5, 7)) > 0.5
    p = str(tmp_path / ("m" + tio.MASK_EXTENSIONS[fmt]))
    assert tio.write_mask(p, m, fmt, encoding=encoding) == name
    enc = tio.mask_encoding(fmt, encoding)
    assert enc.name == name and enc.format == fmt
    assert np.dtype(enc.dtype) == dtype and enc.foreground == on
    if encoding == "uint8":
        assert tio.MASK_ENCODINGS[fmt] == name  # the default
        assert tio.write_mask(p, m, fmt) == name
    if fmt == "png":
        with Image.open(p) as img:
            assert img.mode == "L"
            a = np.asarray(img)
    elif fmt == "npy":
        a = np.load(p, allow_pickle=False)
    else:
        with np.load(p, allow_pickle=False) as z:
            assert z.files == ["mask"]
            a = z["mask"]
    assert a.dtype == dtype
    assert set(np.unique(a).tolist()) <= {0, on}
    np.testing.assert_array_equal(a == on, m)
    np.testing.assert_array_equal(tio.read_mask(p), m)


def test_mask_encoding_errors(tmp_path):
    with pytest.raises(ValueError, match="encoding must be 'uint8' for PNG"):
        tio.write_mask(str(tmp_path / "m.png"), np.zeros((2, 2), bool), "png", encoding="bool")
    with pytest.raises(ValueError, match="encoding must be one of 'uint8', 'bool', got 'u8'"):
        tio.mask_encoding("npy", "u8")
    p = str(tmp_path / "bad.npy")
    np.save(p, np.array([[0, 7]], np.uint8))
    with pytest.raises(ValueError, match=r"bad\.npy: mask must be bool or uint8 0/255"):
        tio.read_mask(p)


def test_write_mask_accepts_tensor_and_rejects_bad(tmp_path):
    m = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    m[0, 0, 1, 2] = True
    p = str(tmp_path / "m.npy")
    tio.write_mask(p, m, "npy")
    np.testing.assert_array_equal(np.load(p) == 255, m[0, 0].numpy())
    with pytest.raises(
        ValueError, match="mask_format must be one of 'png', 'npy', 'npz', got 'jpg'"
    ):
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


# ----------------------------------------------------------------------------
# Input limits and hostile inputs (issue #8, item 9 of "Why")
# ----------------------------------------------------------------------------


def _bomb_png(path, width, height):
    """A valid 8-bit grayscale PNG of zeros, compressed as a stream (never in memory)."""
    import struct
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte 0, then the row
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat))
        f.write(chunk(b"IEND", b""))


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    p = str(tmp_path / "bomb.png")
    _bomb_png(p, 13000, 13000)  # 169 Mpx, 169 MB decoded
    assert os.path.getsize(p) < 300_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(p) as img:  # a real PNG of that size
            assert img.size == (13000, 13000) and img.mode == "L"

    def no_decoding(self, *a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for read in (tio.read_map, tio.read_image):
        with pytest.raises(tio.InputError, match=r"bomb\.png: the image has 169000000 pixels") as e:
            read(p)
        assert e.value.kind == "too_large" and e.value.path == p
        assert "max_pixels=134217728" in str(e.value)
        assert isinstance(e.value, ValueError)
    assert tio.DEFAULT_MAX_PIXELS == 2**27


def test_small_bomb_under_the_cap_is_read(tmp_path):
    p = str(tmp_path / "wide.png")
    _bomb_png(p, 3000, 2)
    np.testing.assert_array_equal(tio.read_map(p, max_pixels=6000), np.zeros((2, 3000)))
    with pytest.raises(tio.InputError, match="6000 pixels"):
        tio.read_map(p, max_pixels=5999)


def _write_every_format(d, a):
    """``a`` (6x7, float32) saved in each map format; returns the paths."""
    paths = []
    for name, save in [
        ("m.npy", lambda p: np.save(p, a)),
        ("m.npz", lambda p: np.savez_compressed(p, anomaly_map=a[None])),
        ("m.pt", lambda p: torch.save(torch.from_numpy(a), p)),
        (
            "old.pt",
            lambda p: torch.save(torch.from_numpy(a), p, _use_new_zipfile_serialization=False),
        ),
        ("m.tif", lambda p: Image.fromarray(a, mode="F").save(p)),
        ("m.png", lambda p: Image.fromarray((a * 255).astype(np.uint8), mode="L").save(p)),
    ]:
        p = os.path.join(d, name)
        save(p)
        paths.append(p)
    return paths


def test_max_pixels_every_format_boundary(tmp_path):
    a = _maps(tmp_path)  # 6 x 7 = 42 pixels
    for p in _write_every_format(str(tmp_path), a):
        assert tio.read_map(p, max_pixels=42).shape == (6, 7)
        assert tio.read_map(p, max_pixels=None).shape == (6, 7)
        with pytest.raises(tio.InputError, match=r"has 42 pixels \(.*\), more than max_pixels=41"):
            tio.read_map(p, max_pixels=41)
    with pytest.raises(ValueError, match="max_pixels must be an integer >= 1 or None, got 0"):
        tio.read_map(p, max_pixels=0)
    with pytest.raises(TypeError, match="max_pixels must be an integer or None"):
        tio.read_map(p, max_pixels=1.5)
    with pytest.raises(TypeError, match="max_pixels must be an integer or None"):
        tio.read_image(p, max_pixels=True)


def _npy_header_only(path, shape, dtype="<f4"):
    """A .npy whose header claims ``shape`` but holds no data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": dtype, "fortran_order": False, "shape": shape}
        )
    with open(path, "rb") as f:
        return f.read()


def test_npy_and_npz_headers_checked_before_reading(tmp_path):
    import zipfile

    p = str(tmp_path / "huge.npy")
    header = _npy_header_only(p, (100000, 100000))
    with pytest.raises(tio.InputError, match=r"huge\.npy: the map has 10000000000 pixels"):
        tio.read_map(p)
    z = str(tmp_path / "huge.npz")
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("anomaly_map.npy", header)
    with pytest.raises(
        tio.InputError, match=r"huge\.npz: the map \(array 'anomaly_map'\) has 10000000000 pixels"
    ):
        tio.read_map(z)
    # Under the cap, the same truncated file is a clear read error.
    _npy_header_only(p, (10, 10))
    with pytest.raises(tio.InputError, match=r"huge\.npy: cannot read map") as e:
        tio.read_map(p)
    assert e.value.kind == "unreadable"


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("RGBA", 4), ("LA", 2), ("P", 1)])
@pytest.mark.parametrize("height", [1, 2, 3, 4])
def test_colour_png_is_not_a_map_whatever_its_height(tmp_path, mode, channels, height):
    p = str(tmp_path / f"c{height}.png")
    Image.new(mode, (5, height)).save(p)
    with pytest.raises(
        tio.InputError,
        match=rf"c{height}\.png: map must have shape \(H, W\) with one channel.* got mode {mode}",
    ) as e:
        tio.read_map(p)
    assert e.value.kind == "bad_shape"
    assert tio.read_image(p).shape == (height, 5, 3)  # as an image it is fine


def test_one_row_gray_png_is_a_map(tmp_path):
    a = np.arange(5, dtype=np.uint8)[None]
    p = str(tmp_path / "row.png")
    Image.fromarray(a, mode="L").save(p)
    np.testing.assert_array_equal(tio.read_map(p), a.astype(np.float32))


def test_multipage_tiff(tmp_path):
    rng = np.random.default_rng(5)
    pages = [rng.random((4, 6)).astype(np.float32) for _ in range(2)]
    p = str(tmp_path / "two.tif")
    first, *rest = (Image.fromarray(a, mode="F") for a in pages)
    first.save(p, save_all=True, append_images=rest)
    with Image.open(p) as img:
        assert img.n_frames == 2
    for read in (tio.read_map, tio.read_image):
        with pytest.raises(
            tio.InputError, match=r"two\.tif: has 2 pages \(TIFF\); expected a single page"
        ) as e:
            read(p)
        assert e.value.kind == "bad_shape"
    got = tio.read_map(p, multipage="stack")
    assert got.shape == (2, 4, 6) and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.stack(pages))
    assert tio.read_image(p, multipage="stack").shape == (2, 4, 6, 3)
    with pytest.raises(tio.InputError, match="has 48 pixels"):
        tio.read_map(p, multipage="stack", max_pixels=47)  # the cap counts every page
    single = str(tmp_path / "one.npy")
    np.save(single, pages[0])
    assert tio.read_map(single, multipage="stack").shape == (1, 4, 6)
    with pytest.raises(ValueError, match="multipage must be one of 'error', 'stack', got 'all'"):
        tio.read_map(single, multipage="all")


def test_garbage_npy_has_a_clear_message(tmp_path):
    p = str(tmp_path / "junk.npy")
    with open(p, "wb") as f:
        f.write(b"not numpy at all")
    with pytest.raises(tio.InputError, match=r"junk\.npy: the file is not a NumPy array file") as e:
        tio.read_map(p)
    assert "allow_pickle" not in str(e.value) and e.value.kind == "unreadable"
    p = str(tmp_path / "objects.npy")
    np.save(p, np.array([[{"a": 1}, None]], dtype=object), allow_pickle=True)
    with pytest.raises(tio.InputError, match=r"objects\.npy: the file holds Python objects") as e:
        tio.read_map(p)
    assert "allow_pickle" not in str(e.value)
    p = str(tmp_path / "junk.npz")
    with open(p, "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(tio.InputError, match=r"junk\.npz: not a NumPy \.npz file") as e:
        tio.read_map(p)
    assert "allow_pickle" not in str(e.value)


def _unblock_fifo(path):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


def _call_with_timeout(fn, path, seconds=10.0):
    import threading

    box = {}

    def target():
        try:
            box["result"] = fn(path)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        _unblock_fifo(path)
        t.join(5)
        pytest.fail(f"{fn.__name__}({path!r}) blocked for {seconds} s")
    return box


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["pipe.npy", "pipe.npz", "pipe.pt", "pipe.png", "pipe.tif"])
def test_fifo_is_not_a_regular_file_and_never_blocks(tmp_path, name):
    p = str(tmp_path / name)
    os.mkfifo(p)
    assert tio.list_inputs(str(tmp_path)) == [p]  # listed, so its error is reported
    for read in (tio.read_map, tio.read_image):
        box = _call_with_timeout(read, p)
        e = box.get("error")
        assert isinstance(e, tio.InputError), box
        assert e.kind == "not_regular_file"
        assert str(e) == f"{p}: not a regular file: expected a file, got a FIFO"


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null here")
def test_devices_and_directories_are_not_regular_files(tmp_path):
    with pytest.raises(
        tio.InputError, match=r"/dev/null: not a regular file: .* got a character device"
    ):
        tio.read_map("/dev/null")
    link = str(tmp_path / "null.npy")
    os.symlink("/dev/null", link)
    for read in (tio.read_map, tio.read_image):
        with pytest.raises(
            tio.InputError, match=r"null\.npy: not a regular file: .* character device"
        ):
            read(link)
    d = str(tmp_path / "folder.npy")
    os.mkdir(d)
    with pytest.raises(tio.InputError, match=r"folder\.npy: not a regular file: .* a directory"):
        tio.read_map(d)


def test_missing_file_says_no_such_file(tmp_path):
    dangling = str(tmp_path / "dangling.npy")
    os.symlink(str(tmp_path / "gone.npy"), dangling)
    assert tio.list_inputs(str(tmp_path)) == [dangling]  # listed, so its error is reported
    for p in (str(tmp_path / "missing.npy"), str(tmp_path / "missing.png"), dangling):
        for read in (tio.read_map, tio.read_image):
            with pytest.raises(FileNotFoundError, match=r": no such file$") as e:
                read(p)
            assert str(e.value).startswith(p)
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        tio.read_map(str(tmp_path / "missing.npy" / "below.npy"))


# ----------------------------------------------------------------------------
# Symlinks and globs
# ----------------------------------------------------------------------------


def test_symlink_loop_is_walked_once(tmp_path):
    for rel in ["a/1.npy", "a/b/2.npy", "c/3.npy"]:
        _touch(str(tmp_path / rel))
    os.symlink(str(tmp_path), str(tmp_path / "a" / "b" / "up"))  # a loop back to the root
    os.symlink("..", str(tmp_path / "c" / "parent"))  # a relative loop
    want = sorted(str(tmp_path / r) for r in ["a/1.npy", "a/b/2.npy", "c/3.npy"])
    assert tio.list_inputs(str(tmp_path)) == want
    assert tio.list_inputs(str(tmp_path / "**" / "*.npy")) == want
    # From a/, the link up leads to c/, reachable no other way; a/ itself is not walked twice.
    got = tio.list_inputs(str(tmp_path / "a" / "**" / "*.npy"))
    assert got == want[:2] + [str(tmp_path / "a/b/up/c/3.npy")]


def test_symlinked_files_and_folders_listed_once(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    for rel in ["root/a/1.npy", "outside/x.npy", "outside/sub/y.npy"]:
        _touch(str(tmp_path / rel))
    os.symlink(str(root / "a" / "1.npy"), str(root / "alias.npy"))  # file reached twice
    os.symlink(str(outside), str(root / "z_ext"))  # a folder outside, through two links
    os.symlink(str(outside), str(root / "m_ext"))
    os.symlink(str(outside / "x.npy"), str(root / "k.npy"))  # and its file through a third
    os.link(str(root / "a" / "1.npy"), str(root / "hard.npy"))  # hard link: its own input
    want = sorted(str(root / r) for r in ["a/1.npy", "hard.npy", "k.npy", "m_ext/sub/y.npy"])
    assert tio.list_inputs(str(root)) == want
    assert tio.list_inputs(str(root / "**" / "*.npy")) == want
    # One level down: the outside folder once, under its smaller link name.
    got = tio.list_inputs(str(root / "*" / "*.npy"))
    assert got == [str(root / "a/1.npy"), str(root / "m_ext/x.npy")]


@pytest.mark.parametrize(
    "pattern",
    ["**/*.npy", "*/*.npy", "a/**", "**/1.npy", "a/*/?.npy", "[ab]/*.npy", "**", "*", "a/**/*"],
)
def test_glob_matches_the_standard_glob(tmp_path, pattern):
    import glob

    for rel in ["1.npy", "a/1.npy", "a/x/2.npy", "a/x/y/3.npy", "b/4.npy", "b/q/.h.npy", "c.txt"]:
        _touch(str(tmp_path / rel))
    spec = str(tmp_path / pattern)
    want = sorted(
        f
        for f in glob.glob(spec, recursive=True)
        if os.path.isfile(f)
        and not any(q.startswith(".") for q in os.path.relpath(f, tmp_path).split(os.sep))
    )
    assert want  # the oracle found something
    assert tio.list_inputs(spec, None) == want


def test_relative_glob_keeps_relative_paths(tmp_path, monkeypatch):
    import glob

    for rel in ["a/1.npy", "a/x/2.npy"]:
        _touch(str(tmp_path / rel))
    monkeypatch.chdir(tmp_path)
    for spec in ["**/*.npy", "a/**/*.npy", "./a/*.npy"]:
        assert tio.list_inputs(spec) == sorted(glob.glob(spec, recursive=True))


def test_docstring_examples_run(tmp_path, monkeypatch):
    import doctest

    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(tio, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


def test_list_inputs_exclude_dirs(tmp_path):
    for rel in ["maps/a.npy", "maps/out/masks/a.npy.npy", "maps/sub/b.npy"]:
        _touch(str(tmp_path / rel))
    os.symlink(str(tmp_path / "maps" / "out"), str(tmp_path / "maps" / "zlink"))
    want = [str(tmp_path / "maps/a.npy"), str(tmp_path / "maps/sub/b.npy")]
    # any spelling of the folder (here through a link and a relative part) excludes it
    other = str(tmp_path / "maps" / "sub" / ".." / "zlink")
    for spec in (str(tmp_path / "maps"), str(tmp_path / "maps" / "**" / "*.npy")):
        assert tio.list_inputs(spec, exclude_dirs=[other]) == want
        assert len(tio.list_inputs(spec)) == 3  # without it, the output is read back
    with pytest.raises(FileNotFoundError, match="no files matching"):
        tio.list_inputs(str(tmp_path / "maps"), exclude_dirs=[str(tmp_path / "maps")])
