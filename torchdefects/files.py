"""File input and output: listing inputs, reading maps and images, writing masks and records.

Plain Python and NumPy; nothing here enters a scripted graph.

Value scaling: :func:`read_map` never rescales. An 8-bit PNG gives values 0..255, a 16-bit
PNG 0..65535, a float TIFF its stored floats, all as ``float32``. A map saved as an image
must therefore be calibrated and thresholded in the same units it was saved in.

Writes are atomic: data goes to a hidden temporary file in the target's directory, is
flushed and ``fsync``-ed, then ``os.replace``-d over the target, so a reader sees the old
file or the new one, never half of one. JSONL records are the exception: they are appended
and flushed one line per call, and a reader skips a torn last line (a crash mid-write).
"""

import contextlib
import glob
import hashlib
import io
import json
import math
import os
import re
import tempfile
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAP_EXTENSIONS",
    "MASK_ENCODINGS",
    "MASK_EXTENSIONS",
    "JsonlContents",
    "JsonlWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "input_root",
    "json_safe",
    "list_inputs",
    "read_image",
    "read_jsonl",
    "read_map",
    "safe_relative_stem",
    "write_mask",
]

MAP_EXTENSIONS: Tuple[str, ...] = (".npy", ".npz", ".pt", ".pth", ".png", ".tif", ".tiff")
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: mask format (``--mask-format``) -> encoding name recorded next to the file.
MASK_ENCODINGS: Dict[str, str] = {"png": "png_0_255", "npy": "npy_bool", "npz": "npz_bool"}
#: mask format -> file extension.
MASK_EXTENSIONS: Dict[str, str] = {"png": ".png", "npy": ".npy", "npz": ".npz"}

_NPZ_KEYS: Tuple[str, ...] = ("anomaly_map", "map")
_GLOB_MAGIC = re.compile(r"[*?\[]")


# ----------------------------------------------------------------------------
# Listing inputs
# ----------------------------------------------------------------------------


def _norm_exts(extensions: Optional[Iterable[str]]) -> Optional[Tuple[str, ...]]:
    if extensions is None:
        return None
    if isinstance(extensions, str):
        extensions = [extensions]
    return tuple(("." + e.lower().lstrip(".")) for e in extensions)


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.replace(os.sep, "/").split("/") if part)


def input_root(dir_or_glob: str) -> str:
    """The directory that output names are made relative to.

    A directory is its own root; a glob's root is its longest leading part without
    wildcards (``maps/**/*.npy`` -> ``maps``); a single file's root is its directory.
    """
    p = os.fspath(dir_or_glob)
    if os.path.isdir(p):
        return os.path.normpath(p)
    if _GLOB_MAGIC.search(p) is None:
        return os.path.normpath(os.path.dirname(p) or ".")
    parts = p.replace(os.sep, "/").split("/")
    static: List[str] = []
    for part in parts[:-1]:
        if _GLOB_MAGIC.search(part):
            break
        static.append(part)
    if not static:
        return "."
    root = "/".join(static)
    return os.path.normpath(root if root else "/")


def list_inputs(
    dir_or_glob: str, extensions: Optional[Iterable[str]] = MAP_EXTENSIONS
) -> List[str]:
    """Files to process, sorted by path so every run and every rank sees the same order.

    Args:
        dir_or_glob: a directory (searched recursively), a glob (``**`` recurses) or a file.
        extensions: keep files whose suffix is one of these (case-insensitive);
            ``None`` keeps every file. Hidden files and folders (``.name``) are skipped.

    Returns:
        paths as strings, sorted.

    Raises:
        FileNotFoundError: nothing matched; the message gives the pattern and extensions.

    Example:
        >>> paths = list_inputs("maps/", (".npy",))  # doctest: +SKIP
    """
    p = os.fspath(dir_or_glob)
    exts = _norm_exts(extensions)
    found: List[str] = []
    if os.path.isdir(p):
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith("."):
                    found.append(os.path.join(dirpath, name))
    elif os.path.isfile(p):
        found.append(p)
    else:
        found.extend(
            f
            for f in glob.glob(p, recursive=True)
            if os.path.isfile(f) and not _is_hidden(os.path.relpath(f, input_root(p)))
        )
    if exts is not None:
        found = [f for f in found if os.path.splitext(f)[1].lower() in exts]
    if not found:
        wanted = "any extension" if exts is None else "extensions " + ", ".join(exts)
        if not os.path.exists(p) and _GLOB_MAGIC.search(p) is None:
            raise FileNotFoundError(f"inputs: {p!r} does not exist")
        raise FileNotFoundError(f"inputs: no files matching {p!r} with {wanted}")
    return sorted(found)


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def _to_hw(arr: np.ndarray, path: str) -> np.ndarray:
    shape = tuple(arr.shape)
    if arr.ndim == 3 and shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 4 and shape[0] == 1 and shape[1] == 1:
        arr = arr[0, 0]
    elif arr.ndim != 2:
        raise ValueError(
            f"{path}: map must have shape (H, W), (1, H, W) or (1, 1, H, W), got {list(shape)}"
        )
    if arr.size == 0:
        raise ValueError(f"{path}: map is empty, shape {list(shape)}")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{path}: map must hold real numbers, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    return out if out.flags.writeable else out.copy()  # pillow's arrays are read-only


def _pick_from_mapping(keys: Sequence[str], path: str, what: str) -> str:
    if len(keys) == 1:
        return keys[0]
    for k in _NPZ_KEYS:
        if k in keys:
            return k
    listed = ", ".join(repr(k) for k in keys) if keys else "none"
    raise ValueError(
        f"{path}: {what} holds {len(keys)} arrays ({listed}); expected one array or a key "
        f"named {' or '.join(repr(k) for k in _NPZ_KEYS)}"
    )


def _read_pt(path: str) -> np.ndarray:
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        keys = [str(k) for k in obj]
        obj = obj[_pick_from_mapping(keys, path, "the saved dict")]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a saved tensor, got {type(obj).__name__}")
    if obj.is_complex() or obj.dtype == torch.bool:
        raise ValueError(f"{path}: map must hold real numbers, got dtype {obj.dtype}")
    return obj.detach().to(torch.float32).numpy()


def _read_pil_array(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("P", "PA"):
            raise ValueError(f"{path}: palette images are not anomaly maps (mode {img.mode})")
        return np.asarray(img)


def read_map(path: str) -> np.ndarray:
    """Read one anomaly map as ``float32`` of shape (H, W).

    Formats: ``.npy``; ``.npz`` (its only array, else the key ``anomaly_map`` or ``map``);
    ``.pt``/``.pth`` (a tensor, or a dict with one tensor or those keys, loaded with
    ``weights_only=True``); PNG (8- or 16-bit grayscale) and TIFF (float or integer) through
    pillow. Values are kept raw, only cast to ``float32`` (no division by 255 or 65535).

    Args:
        path: the file.

    Returns:
        :math:`(H, W)` ``float32`` array, C-contiguous.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported extension, unreadable content, a shape other than
            (H, W), (1, H, W), (1, 1, H, W), an empty map, or a non-numeric dtype.
            Every message starts with the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arr = z[_pick_from_mapping(list(z.files), path, "the .npz file")]
        elif ext in (".pt", ".pth"):
            arr = _read_pt(path)
        elif ext in (".png", ".tif", ".tiff"):
            arr = _read_pil_array(path)
        else:
            raise ValueError(
                f"{path}: unsupported map extension {ext!r}; expected one of "
                + ", ".join(MAP_EXTENSIONS)
            )
        return _to_hw(np.asarray(arr), path)
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: cannot read map: {e}") from e
    except Exception as e:
        # np.load, torch.load and pillow report corrupt files with many exception types
        # (OSError, EOFError, BadZipFile, UnpicklingError, RuntimeError, ...).
        raise ValueError(f"{path}: cannot read map: {type(e).__name__}: {e}") from e


def read_image(path: str) -> np.ndarray:
    """Read an image as RGB ``uint8`` of shape (H, W, 3) through pillow.

    Grayscale and palette images are converted to RGB, alpha is dropped; 16-bit grayscale
    is scaled to 8 bits (divided by 257), 32-bit integer grayscale is clipped to 0..255.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: pillow cannot decode it; the message starts with the path.
    """
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # pillow's RGB conversion of 16/32-bit gray clips; scale 16-bit to 8-bit.
                a = np.asarray(img).astype(np.float64)
                if img.mode != "I":
                    a = a / 257.0
                a8 = np.clip(np.round(a), 0, 255).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(a8[:, :, None], 3, axis=2))
            return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read image: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported (e.g. Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, replace).

    The parent folder is created if missing. On any error the temporary file is removed
    and ``path`` is left as it was. With ``durable=False`` the file and folder are not
    fsync-ed: the replace is still atomic for readers and against a killed process (the
    data is in the page cache), but a power loss may lose it; batch runs that write many
    small files use this (about 2 ms saved per file here).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any, indent: Optional[int] = 2) -> None:
    """Write ``obj`` as strict JSON (NaN and infinities become ``null``), atomically."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False, sort_keys=False)
    atomic_write_text(path, text + "\n")


# ----------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------


def _mask_hw(mask: Any) -> np.ndarray:
    if hasattr(mask, "detach"):  # a torch tensor, without importing torch here
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {list(np.asarray(mask).shape)}")
    if m.dtype != np.bool_:
        if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
            raise ValueError(f"mask must be boolean, got dtype {m.dtype}")
        if m.size and not np.isin(m, (0, 1)).all():
            raise ValueError("mask must be boolean or hold only 0 and 1")
        m = m != 0
    return np.ascontiguousarray(m)


def write_mask(path: str, mask: Any, fmt: str = "png", durable: bool = True) -> str:
    """Write a binary mask atomically and return its encoding name.

    Args:
        path: destination; its extension is not checked (see ``MASK_EXTENSIONS``).
        mask: :math:`(H, W)` boolean (or 0/1) array or tensor; leading size-1 dims are dropped.
        fmt: ``"png"`` (8-bit grayscale, 0 and 255: ``"png_0_255"``), ``"npy"``
            (``bool`` array: ``"npy_bool"``) or ``"npz"`` (compressed, key ``mask``:
            ``"npz_bool"``).
        durable: fsync the file and its folder (see :func:`atomic_write_bytes`).

    Returns:
        the encoding name, for the record that points at the file.
    """
    if fmt not in MASK_ENCODINGS:
        raise ValueError(f"mask_format must be one of {', '.join(MASK_ENCODINGS)}, got {fmt!r}")
    m = _mask_hw(mask)
    buf = io.BytesIO()
    if fmt == "png":
        from PIL import Image

        Image.fromarray(m.astype(np.uint8) * np.uint8(255), mode="L").save(buf, format="PNG")
    elif fmt == "npy":
        np.save(buf, m, allow_pickle=False)
    else:
        np.savez_compressed(buf, mask=m)
    atomic_write_bytes(path, buf.getvalue(), durable=durable)
    return MASK_ENCODINGS[fmt]


# ----------------------------------------------------------------------------
# JSON Lines
# ----------------------------------------------------------------------------


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    NaN and infinities become ``None``; tuples become lists; NumPy scalars and arrays and
    torch tensors become Python numbers and lists; dict keys become strings.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor
        return json_safe(obj.detach().cpu().tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


class JsonlWriter:
    """Append records to a JSON Lines file, one flushed line per :meth:`write`.

    Opening an existing file whose last line is torn (no final newline, from a crash
    mid-write) cuts that partial line off first, so new records start on a fresh line;
    ``truncated_bytes`` says how many bytes were cut.

    Args:
        path: the file; created (with its folder) if missing.
        fsync: also ``os.fsync`` after each record (slower, survives power loss).

    Example:
        >>> with JsonlWriter("out/records.jsonl") as w:  # doctest: +SKIP
        ...     w.write({"path": "a.npy", "score": float("nan")})  # score -> null
    """

    def __init__(self, path: str, fsync: bool = False) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync
        self.truncated_bytes = _cut_torn_tail(self.path)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._f: Optional[io.TextIOWrapper] = open(  # noqa: SIM115
            self.path, "a", encoding="utf-8", newline="\n"
        )

    def write(self, record: Dict[str, Any]) -> None:
        if self._f is None:
            raise ValueError(f"{self.path}: JsonlWriter is closed")
        line = json.dumps(json_safe(record), allow_nan=False, separators=(",", ":"))
        self._f.write(line + "\n")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cut_torn_tail(path: str) -> int:
    """Cut bytes after the last newline of ``path``; return how many were cut."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan back in blocks for the last newline.
        pos = size
        keep = 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = pos + i + 1
                break
        f.truncate(keep)
        return size - keep


class JsonlContents(NamedTuple):
    """What :func:`read_jsonl` found.

    Attributes:
        records: the parsed records, in file order.
        torn_line: 1-based number of a torn last line that was skipped, else ``None``.
    """

    records: List[Any]
    torn_line: Optional[int]


def read_jsonl(path: str) -> JsonlContents:
    """Read a JSON Lines file, skipping a torn last line.

    A last line that has no final newline and does not parse is a write cut short by a
    crash: it is skipped and reported in ``torn_line``. A bad line anywhere else is
    corruption and raises. Blank lines are ignored.

    Raises:
        ValueError: a line other than the last does not parse; the message gives path and
            line number.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    if complete:
        lines = lines[:-1]
    records: List[Any] = []
    torn: Optional[int] = None
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as e:
            if i == len(lines) - 1 and not complete:
                torn = i + 1
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {e}") from e
    return JsonlContents(records, torn)


# ----------------------------------------------------------------------------
# Output names
# ----------------------------------------------------------------------------

_MAX_COMPONENT = 120


def _safe_component(part: str) -> Tuple[str, bool]:
    """The part with unsafe characters replaced; and whether anything changed."""
    safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", part).lstrip(".")
    if len(safe) > _MAX_COMPONENT:
        safe = safe[:_MAX_COMPONENT]
    if not safe:
        safe = "_"
    return safe, safe != part


def safe_relative_stem(path: str, root: str) -> str:
    """A stable, safe output name for ``path`` relative to ``root``.

    The name is the relative path with ``/`` separators and the file name kept whole,
    extension included (``a/img.npy`` -> ``"a/img.npy"``; callers append their own
    suffix, e.g. ``".mask.png"``), so two ``img.npy`` in different folders and ``img.npy``
    next to ``img.npz`` do not collide. It depends on ``path`` and ``root`` only, so
    shards and reruns agree. Characters outside ``[A-Za-z0-9._-]``, leading dots and
    over-long parts are replaced; when anything was replaced the name ends with
    ``~`` and 12 hex digits of the SHA-256 of the original relative path, which keeps it
    unique (``~`` never appears otherwise). The result is never absolute and has no
    ``..`` part, so it stays inside the output folder; it may contain ``/``: create parent
    folders.

    Raises:
        ValueError: ``path`` is not inside ``root``.
    """
    rel = os.path.relpath(os.path.abspath(os.fspath(path)), os.path.abspath(os.fspath(root)))
    parts = [p for p in rel.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if not parts or parts[0] == ".." or os.path.isabs(rel):
        raise ValueError(f"{path}: not inside the input root {root}")
    safe_parts = []
    changed = False
    for p in parts:
        s, c = _safe_component(p)
        safe_parts.append(s)
        changed = changed or c
    name = "/".join(safe_parts)
    if changed:
        digest = hashlib.sha256("/".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
        name += "~" + digest[:12]
    return name
