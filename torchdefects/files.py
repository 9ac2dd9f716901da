"""File input and output: listing inputs, reading maps and images, writing masks and records.

Plain Python and NumPy; nothing here enters a scripted graph.

Value scaling: :func:`read_map` never rescales. An 8-bit PNG gives values 0..255, a 16-bit
PNG 0..65535, a float TIFF its stored floats, all as ``float32``. A map saved as an image
must therefore be calibrated and thresholded in the same units it was saved in.

Input checks, before any pixel is decoded: the path must be a regular file (FIFOs,
sockets and devices are refused without a blocking open), and the size in the file's
header must not exceed ``max_pixels`` (:data:`DEFAULT_MAX_PIXELS`, 2**27, a fixed
number so results never depend on the machine). Every refusal is an :class:`InputError`
(a ``ValueError``) whose message starts with the path and says what was expected and
what came; a missing file is a ``FileNotFoundError`` ("PATH: no such file").

Writes are atomic: data goes to a hidden temporary file in the target's directory, is
flushed and ``fsync``-ed, then ``os.replace``-d over the target, so a reader sees the old
file or the new one, never half of one. JSONL records are the exception: they are appended
and flushed one line per call, and a reader skips a torn last line (a crash mid-write).
"""

import contextlib
import fnmatch
import hashlib
import heapq
import io
import json
import math
import os
import re
import stat
import tempfile
import warnings
from typing import (
    Any,
    BinaryIO,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
)

import numpy as np

from torchdefects._check import check_choice, check_int

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "INPUT_ERROR_KINDS",
    "MAP_EXTENSIONS",
    "MASK_ENCODINGS",
    "MASK_EXTENSIONS",
    "MASK_VALUE_ENCODINGS",
    "MULTIPAGE_CHOICES",
    "InputError",
    "JsonlContents",
    "JsonlWriter",
    "MaskEncoding",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "input_root",
    "json_safe",
    "list_inputs",
    "mask_encoding",
    "read_image",
    "read_jsonl",
    "read_map",
    "read_mask",
    "safe_relative_stem",
    "write_mask",
]

MAP_EXTENSIONS: Tuple[str, ...] = (".npy", ".npz", ".pt", ".pth", ".png", ".tif", ".tiff")
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: mask format (``--mask-format``) -> the default encoding's name, recorded next to the
#: file: 0 and 255 in ``uint8`` for every format (see :func:`mask_encoding`).
MASK_ENCODINGS: Dict[str, str] = {
    "png": "png_0_255",
    "npy": "npy_uint8_0_255",
    "npz": "npz_uint8_0_255",
}
#: ``write_mask(encoding=...)`` choices: ``"uint8"`` (0/255, default) or ``"bool"``.
MASK_VALUE_ENCODINGS: Tuple[str, ...] = ("uint8", "bool")
#: mask format -> file extension.
MASK_EXTENSIONS: Dict[str, str] = {"png": ".png", "npy": ".npy", "npz": ".npz"}

_NPZ_KEYS: Tuple[str, ...] = ("anomaly_map", "map")
_GLOB_MAGIC = re.compile(r"[*?\[]")


# ----------------------------------------------------------------------------
# Limits and errors
# ----------------------------------------------------------------------------

#: Default cap on the pixels one :func:`read_map` or :func:`read_image` call may return:
#: 2**27 = 134,217,728 (a 11585 x 11585 map; 512 MiB as float32). A fixed number, never
#: derived from the machine's memory, so a run gives the same records everywhere.
DEFAULT_MAX_PIXELS: int = 2**27

#: ``multipage`` choices: ``"error"`` refuses a multi-page TIFF, ``"stack"`` reads every
#: page and returns a batch.
MULTIPAGE_CHOICES: Tuple[str, ...] = ("error", "stack")

#: ``InputError.kind`` values.
INPUT_ERROR_KINDS: Tuple[str, ...] = (
    "unreadable",
    "bad_shape",
    "empty_map",
    "too_large",
    "not_regular_file",
)

# Pillow modes that hold one channel of real numbers (``"1"``, bilevel, gives booleans).
_MAP_MODES: Tuple[str, ...] = ("L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class InputError(ValueError):
    """An input file that exists but cannot be used; a ``ValueError``.

    The message starts with the path and says what was expected and what came.

    Attributes:
        path: the file.
        kind: one of :data:`INPUT_ERROR_KINDS` (``"too_large"``: over ``max_pixels``;
            ``"not_regular_file"``: a FIFO, socket, device or directory; ``"bad_shape"``:
            not one map or image of the expected layout, e.g. RGB as a map or a
            multi-page TIFF; ``"empty_map"``; ``"unreadable"``: corrupt or unsupported).
    """

    def __init__(self, path: str, kind: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.kind = kind


def _check_max_pixels(max_pixels: Optional[int]) -> None:
    check_int("max_pixels", max_pixels, minimum=1, allow_none=True)


def _check_size(path: str, what: str, shape: Sequence[int], max_pixels: Optional[int]) -> None:
    n = 1
    for s in shape:
        n *= int(s)
    if max_pixels is not None and n > max_pixels:
        dims = " x ".join(str(int(s)) for s in shape)
        raise InputError(
            path,
            "too_large",
            f"{what} has {n} pixels ({dims}), more than max_pixels={max_pixels}; "
            "refused before decoding (raise max_pixels to read it)",
        )


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _file_kind(mode: int) -> str:
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _check_regular_file(path: str) -> None:
    """Raise unless ``path`` is a regular file (following symlinks); never opens it."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(path, "unreadable", f"cannot access: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            path,
            "not_regular_file",
            f"not a regular file: expected a file, got {_file_kind(st.st_mode)}",
        )


def _open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading after :func:`_check_regular_file`.

    Opened non-blocking and checked again with ``fstat``, so a FIFO swapped in after the
    first check is refused instead of blocking the reader forever.
    """
    _check_regular_file(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(
                path,
                "not_regular_file",
                f"not a regular file: expected a file, got {_file_kind(mode)}",
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ----------------------------------------------------------------------------
# Listing inputs
# ----------------------------------------------------------------------------


def _norm_exts(extensions: Optional[Iterable[str]]) -> Optional[Tuple[str, ...]]:
    if extensions is None:
        return None
    if isinstance(extensions, str):
        extensions = [extensions]
    return tuple(("." + e.lower().lstrip(".")) for e in extensions)


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


def _split_glob(pattern: str) -> Tuple[str, List[str]]:
    """The folder before the first wildcard, as written, and the pattern's parts below it.

    ``maps/**/*.npy`` -> ``("maps", ["**", "*.npy"])``; ``*.npy`` -> ``("", ["*.npy"])``.
    """
    parts = pattern.replace(os.sep, "/").split("/")
    for i, part in enumerate(parts):
        if _GLOB_MAGIC.search(part):
            root = "/".join(parts[:i]) or ("/" if i else "")
            return root, [q for q in parts[i:] if q not in ("", ".")]
    return pattern, []


def _match(pat: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether the path ``parts`` matches the glob ``pat`` (``**`` is any number of folders)."""
    if not pat:
        return not parts
    if pat[0] == "**":
        if len(pat) == 1:
            return len(parts) >= 1
        return any(_match(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match(pat[1:], parts[1:])


def _may_contain(pat: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether a folder at ``parts`` may hold a file matching ``pat``."""
    if not parts:
        return True
    if not pat:
        return False
    if pat[0] == "**":
        return True
    return fnmatch.fnmatchcase(parts[0], pat[0]) and _may_contain(pat[1:], parts[1:])


def _walk(root: str, pat: Optional[Sequence[str]], exclude: Sequence[str] = ()) -> List[str]:
    """Files under ``root`` (all, or those matching ``pat``), each file and folder once.

    Folders are walked without following links first; then symlinked folders are
    followed, smallest path first, unless the folder they point at was already walked
    (this ends symlink loops and lists a folder reached through two links once). A file
    reached under two names, one of them through a symlink, is listed once: under a name
    without symlinks if it has one, else under its smallest path. Hard links (two
    names, no symlink) are two inputs. Dangling links and FIFOs are listed: reading
    them gives a clear error instead of dropping them silently. Folders in ``exclude``
    (compared by device and inode, so any spelling or link to them matches) are skipped
    with everything below them.
    """
    excluded = set()
    for d in exclude:
        with contextlib.suppress(OSError):
            excluded.add(_file_id(os.stat(d)))
    try:
        root_id = _file_id(os.stat(root))
    except OSError:
        return []
    if root_id in excluded:
        return []
    seen_dirs = {root_id} | excluded
    direct: List[str] = []  # files reached without a symlink
    linked: List[Tuple[str, Optional[Tuple[int, int]]]] = []  # and through one, with ids
    linked_dirs: List[Tuple[str, Tuple[str, ...]]] = []  # heap of (path, rel parts)

    def scan(top: str, top_parts: Tuple[str, ...], via_link: bool) -> None:
        stack = [(top, top_parts)]
        while stack:
            d, dparts = stack.pop()
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue  # unreadable folder: nothing listed from it
            for e in entries:
                if e.name.startswith("."):
                    continue
                parts = (*dparts, e.name)
                try:
                    is_link = e.is_symlink()
                    is_dir = e.is_dir()  # follows links
                except OSError:
                    is_link, is_dir = True, False
                if is_dir:
                    if pat is not None and not _may_contain(pat, parts):
                        continue
                    if is_link:
                        heapq.heappush(linked_dirs, (e.path, parts))
                        continue
                    try:
                        dir_id = _file_id(e.stat(follow_symlinks=False))
                    except OSError:
                        continue
                    if dir_id not in seen_dirs:
                        seen_dirs.add(dir_id)
                        stack.append((e.path, parts))
                    continue
                if pat is not None and not _match(pat, parts):
                    continue
                fid: Optional[Tuple[int, int]] = None
                if via_link or is_link:
                    try:
                        fid = _file_id(e.stat())
                    except OSError:
                        pass  # a dangling link
                    linked.append((e.path, fid))
                else:
                    direct.append(e.path)

    scan(root, (), False)
    while linked_dirs:
        path, parts = heapq.heappop(linked_dirs)
        try:
            dir_id = _file_id(os.stat(path))
        except OSError:
            continue
        if dir_id in seen_dirs:
            continue
        seen_dirs.add(dir_id)
        scan(path, parts, True)

    if not linked:
        return direct
    # Files are stat-ed only here, when symlinks could lead to a file twice.
    direct_ids = set()
    for path in direct:
        with contextlib.suppress(OSError):
            direct_ids.add(_file_id(os.stat(path)))
    best: Dict[Tuple[int, int], str] = {}
    out = list(direct)
    for path, fid in linked:
        if fid is None:
            out.append(path)
        elif fid not in direct_ids and (fid not in best or path < best[fid]):
            best[fid] = path
    return out + list(best.values())


def _file_id(st: os.stat_result) -> Tuple[int, int]:
    return (st.st_dev, st.st_ino)


def list_inputs(
    dir_or_glob: str,
    extensions: Optional[Iterable[str]] = MAP_EXTENSIONS,
    exclude_dirs: Iterable[str] = (),
) -> List[str]:
    """Files to process, sorted by path so every run and every rank sees the same order.

    Symlinks: symlinked files and folders are followed, but every folder is walked once
    (by device and inode), so a symlink loop ends and a folder reached through two links
    is listed once; a file reached both directly and through a symlink is listed once,
    under its name without symlinks (two symlinks only: the smaller path). Hard links
    are separate inputs. Dangling links and special files (FIFOs, sockets) whose names
    match are listed, so the reader reports them instead of them vanishing.

    Args:
        dir_or_glob: a directory (searched recursively), a glob (``**`` is any number of
            folders, matched per path part like :func:`glob.glob`) or a file.
        extensions: keep files whose suffix is one of these (case-insensitive);
            ``None`` keeps every file. Hidden files and folders (``.name``) are skipped.
        exclude_dirs: folders never searched, e.g. a run's output folder inside its
            input folder; matched by device and inode, whatever path or link leads there.

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
    exclude = [os.fspath(d) for d in exclude_dirs]
    if os.path.isdir(p):
        found = _walk(p, None, exclude)
    elif _GLOB_MAGIC.search(p) is None:
        if os.path.lexists(p):
            found.append(p)  # the reader says what is wrong with a FIFO or a dangling link
    else:
        root, pat = _split_glob(p)
        found = _walk(root or ".", pat, exclude)
        if not root:
            found = [f[2:] if f.startswith("./") else f for f in found]
    if exts is not None:
        found = [f for f in found if os.path.splitext(f)[1].lower() in exts]
    if not found:
        wanted = "any extension" if exts is None else "extensions " + ", ".join(exts)
        if not os.path.lexists(p) and _GLOB_MAGIC.search(p) is None:
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
        raise InputError(
            path,
            "bad_shape",
            f"map must have shape (H, W), (1, H, W) or (1, 1, H, W), got {list(shape)}",
        )
    if arr.size == 0:
        raise InputError(path, "empty_map", f"map is empty, shape {list(shape)}")
    _check_real_dtype(path, arr.dtype)
    out = np.ascontiguousarray(arr, dtype=np.float32)
    return out if out.flags.writeable else out.copy()  # pillow's arrays are read-only


def _check_real_dtype(path: str, dtype: Any) -> None:
    dtype = np.dtype(dtype)
    if dtype == np.bool_ or not (
        np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
    ):
        raise InputError(path, "unreadable", f"map must hold real numbers, got dtype {dtype}")


def _pick_from_mapping(keys: Sequence[str], path: str, what: str) -> str:
    if len(keys) == 1:
        return keys[0]
    for k in _NPZ_KEYS:
        if k in keys:
            return k
    listed = ", ".join(repr(k) for k in keys) if keys else "none"
    raise InputError(
        path,
        "unreadable",
        f"{what} holds {len(keys)} arrays ({listed}); expected one array or a key "
        f"named {' or '.join(repr(k) for k in _NPZ_KEYS)}",
    )


def _npy_header(f: BinaryIO, path: str, what: str) -> Tuple[Tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header, reading nothing else."""
    try:
        version = np.lib.format.read_magic(f)
    except ValueError:
        raise InputError(
            path, "unreadable", f"{what} is not a NumPy array file (no .npy magic header)"
        ) from None
    try:
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, SyntaxError, TypeError) as e:
        raise InputError(path, "unreadable", f"{what} has a corrupt .npy header: {e}") from None
    if dtype.hasobject:
        raise InputError(
            path,
            "unreadable",
            f"{what} holds Python objects (dtype {dtype}); expected an array of numbers "
            "(object arrays are never unpickled)",
        )
    return tuple(int(s) for s in shape), dtype


def _read_npy(path: str, max_pixels: Optional[int], real: bool = True) -> np.ndarray:
    with _open_regular(path) as f:
        shape, dtype = _npy_header(f, path, "the file")
        if real:
            _check_real_dtype(path, dtype)
        _check_size(path, "the map", shape, max_pixels)
        f.seek(0)
        return np.load(f, allow_pickle=False)


def _read_npz(path: str, max_pixels: Optional[int]) -> np.ndarray:
    with _open_regular(path) as f:
        if f.read(4) != b"PK\x03\x04":
            raise InputError(path, "unreadable", "not a NumPy .npz file (expected a zip archive)")
        f.seek(0)
        with np.load(f, allow_pickle=False) as z:
            key = _pick_from_mapping(list(z.files), path, "the .npz file")
            member = key if key in z.zip.namelist() else key + ".npy"
            what = f"array {key!r}"
            with z.zip.open(member) as m:
                shape, dtype = _npy_header(m, path, what)
            _check_real_dtype(path, dtype)
            _check_size(path, f"the map ({what})", shape, max_pixels)
            return z[key]


def _read_pt(path: str, max_pixels: Optional[int]) -> np.ndarray:
    import torch

    _check_regular_file(path)
    try:
        # mmap: the tensor's data is not read until used, so the size check comes first.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    if isinstance(obj, dict):
        keys = [str(k) for k in obj]
        obj = obj[_pick_from_mapping(keys, path, "the saved dict")]
    if not isinstance(obj, torch.Tensor):
        raise InputError(path, "unreadable", f"expected a saved tensor, got {type(obj).__name__}")
    if obj.is_complex() or obj.dtype == torch.bool:
        raise InputError(path, "unreadable", f"map must hold real numbers, got dtype {obj.dtype}")
    _check_size(path, "the map", tuple(obj.shape), max_pixels)
    return obj.detach().to(torch.float32).numpy()


@contextlib.contextmanager
def _open_image(path: str, max_pixels: Optional[int], multipage: str) -> Iterator[Any]:
    """Open with pillow, check size and pages from the header, before any decoding.

    Pillow's own global decompression-bomb limit is not touched: its warning is muted
    for this call (``max_pixels`` is the limit here); its hard error, at twice
    ``PIL.Image.MAX_IMAGE_PIXELS`` (179 Mpx by default), still applies to images and is
    reported as ``too_large``.
    """
    from PIL import Image

    with _open_regular(path) as f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(f)
        except Image.DecompressionBombError as e:
            raise InputError(path, "too_large", f"pillow refused it: {e}") from None
        with img:
            w, h = img.size
            pages = int(getattr(img, "n_frames", 1))
            if pages > 1 and multipage == "error":
                raise InputError(
                    path,
                    "bad_shape",
                    f"has {pages} pages ({img.format}); expected a single page "
                    "(multipage='stack' reads every page as a batch)",
                )
            _check_size(path, "the image", (pages, h, w) if pages > 1 else (h, w), max_pixels)
            yield img


def _pil_pages(img: Any, path: str, convert: Callable[[Any], np.ndarray]) -> np.ndarray:
    """Every page of ``img`` through ``convert``, stacked: :math:`(N, ...)`."""
    pages = int(getattr(img, "n_frames", 1))
    out = []
    for i in range(pages):
        img.seek(i)
        a = convert(img)
        if out and a.shape != out[0].shape:
            raise InputError(
                path,
                "bad_shape",
                f"page {i + 1} has shape {list(a.shape)}, page 1 {list(out[0].shape)}; "
                "stacked pages must share one size",
            )
        out.append(a)
    return np.stack(out)


def _pil_map(img: Any, path: str) -> np.ndarray:
    if img.mode not in _MAP_MODES:
        bands = len(img.getbands())
        shape = [img.size[1], img.size[0]] + ([bands] if bands > 1 else [])
        kind = {"P": "a palette image", "PA": "a palette image with alpha", "1": "1-bit"}
        what = kind.get(img.mode, f"{bands} channels, shape {shape}")
        raise InputError(
            path,
            "bad_shape",
            "map must have shape (H, W) with one channel of numbers (a grayscale image: "
            f"mode {', '.join(_MAP_MODES)}), got mode {img.mode} ({what})",
        )
    img.load()
    return np.asarray(img)


def _check_multipage(multipage: str) -> None:
    check_choice("multipage", multipage, MULTIPAGE_CHOICES)


def read_map(
    path: str, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, multipage: str = "error"
) -> np.ndarray:
    """Read one anomaly map as ``float32`` of shape (H, W).

    Formats: ``.npy``; ``.npz`` (its only array, else the key ``anomaly_map`` or ``map``);
    ``.pt``/``.pth`` (a tensor, or a dict with one tensor or those keys, loaded with
    ``weights_only=True``); PNG (8- or 16-bit grayscale) and TIFF (float or integer) through
    pillow. Values are kept raw, only cast to ``float32`` (no division by 255 or 65535).

    Checks before decoding: the path must be a regular file (a FIFO, socket or device
    is refused without being opened for a blocking read); the size in the header
    (``.npy``, each ``.npz`` member, PNG/TIFF) must not exceed ``max_pixels``, so a small
    compressed file that would decode to gigabytes is refused. ``.pt`` files are mapped
    (``mmap``) and checked before their data is read. ``.npy`` never unpickles.

    Args:
        path: the file.
        max_pixels: the most pixels the map may have (all pages together with
            ``multipage="stack"``); ``None`` for no limit. Default
            :data:`DEFAULT_MAX_PIXELS` (2**27).
        multipage: ``"error"`` (default) refuses a multi-page TIFF; ``"stack"`` reads
            every page and returns :math:`(N, H, W)` (``N = 1`` for every single-map
            file), pages of one size only.

    Returns:
        :math:`(H, W)` ``float32`` array, C-contiguous; :math:`(N, H, W)` with
        ``multipage="stack"``.

    Raises:
        FileNotFoundError: the file does not exist (message ``"PATH: no such file"``).
        InputError: (a ``ValueError``) not a regular file, over ``max_pixels``, an
            unsupported extension, unreadable content, a shape other than (H, W),
            (1, H, W), (1, 1, H, W), a colour image, several pages, an empty map, or a
            non-numeric dtype. Every message starts with the path; ``kind`` says which.
        TypeError, ValueError: ``max_pixels`` or ``multipage`` is invalid.

    Example:
        >>> import numpy as np, os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "m.npy")
        >>> np.save(p, np.zeros((1, 4, 5)))
        >>> read_map(p).shape
        (4, 5)
    """
    _check_max_pixels(max_pixels)
    _check_multipage(multipage)
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".png", ".tif", ".tiff"):
            with _open_image(path, max_pixels, multipage) as img:
                if multipage == "stack":
                    pages = _pil_pages(img, path, lambda im: _pil_map(im, path))
                    return np.stack([_to_hw(a, path) for a in pages])
                arr = _pil_map(img, path)
        elif ext == ".npy":
            arr = _read_npy(path, max_pixels)
        elif ext == ".npz":
            arr = _read_npz(path, max_pixels)
        elif ext in (".pt", ".pth"):
            arr = _read_pt(path, max_pixels)
        else:
            _check_regular_file(path)
            raise InputError(
                path,
                "unreadable",
                f"unsupported map extension {ext!r}; expected one of " + ", ".join(MAP_EXTENSIONS),
            )
        out = _to_hw(np.asarray(arr), path)
        return out[None] if multipage == "stack" else out
    except (InputError, FileNotFoundError):
        raise
    except Exception as e:
        # np.load, torch.load and pillow report corrupt files with many exception types
        # (OSError, EOFError, BadZipFile, UnpicklingError, RuntimeError, ...).
        raise InputError(path, "unreadable", f"cannot read map: {type(e).__name__}: {e}") from e


def _pil_rgb(img: Any) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # pillow's RGB conversion of 16/32-bit gray clips; scale 16-bit to 8-bit.
        a = np.asarray(img).astype(np.float64)
        if img.mode != "I":
            a = a / 257.0
        a8 = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a8[:, :, None], 3, axis=2))
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def read_image(
    path: str, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, multipage: str = "error"
) -> np.ndarray:
    """Read an image as RGB ``uint8`` of shape (H, W, 3) through pillow.

    Grayscale and palette images are converted to RGB, alpha is dropped; 16-bit grayscale
    is scaled to 8 bits (divided by 257), 32-bit integer grayscale is clipped to 0..255.
    The checks of :func:`read_map` apply: a regular file, at most ``max_pixels`` pixels
    (from the header, before decoding), one page unless ``multipage="stack"``.

    Args:
        path: the file.
        max_pixels: the most pixels (height x width, all pages together); ``None`` for
            no limit. Default :data:`DEFAULT_MAX_PIXELS`.
        multipage: ``"error"`` (default) or ``"stack"`` (returns :math:`(N, H, W, 3)`).

    Raises:
        FileNotFoundError: the file does not exist.
        InputError: (a ``ValueError``) not a regular file, too large, several pages, or
            pillow cannot decode it; the message starts with the path.
    """
    _check_max_pixels(max_pixels)
    _check_multipage(multipage)
    path = os.fspath(path)
    try:
        with _open_image(path, max_pixels, multipage) as img:
            if multipage == "stack":
                return _pil_pages(img, path, _pil_rgb)
            img.load()
            return _pil_rgb(img)
    except (InputError, FileNotFoundError):
        raise
    except Exception as e:
        raise InputError(path, "unreadable", f"cannot read image: {type(e).__name__}: {e}") from e


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


class MaskEncoding(NamedTuple):
    """How a mask file stores its pixels.

    Attributes:
        name: the name recorded beside the file (``"npy_uint8_0_255"``, ...).
        format: ``"png"``, ``"npy"`` or ``"npz"`` (``.npz``: key ``mask``, compressed).
        dtype: the stored dtype, ``"uint8"`` or ``"bool"``.
        foreground: the stored value of a defect pixel (255, or 1 for ``bool``);
            background is 0.
    """

    name: str
    format: str
    dtype: str
    foreground: int


def mask_encoding(fmt: str, encoding: str = "uint8") -> MaskEncoding:
    """The :class:`MaskEncoding` that :func:`write_mask` uses for ``fmt`` and ``encoding``.

    Example:
        >>> mask_encoding("npy")
        MaskEncoding(name='npy_uint8_0_255', format='npy', dtype='uint8', foreground=255)
        >>> mask_encoding("npz", "bool").name
        'npz_bool'
    """
    check_choice("mask_format", fmt, tuple(MASK_EXTENSIONS))
    check_choice("encoding", encoding, MASK_VALUE_ENCODINGS)
    if fmt == "png" and encoding != "uint8":
        raise ValueError(f"encoding must be 'uint8' for PNG masks (0 and 255), got {encoding!r}")
    if encoding == "bool":
        return MaskEncoding(f"{fmt}_bool", fmt, "bool", 1)
    return MaskEncoding("png_0_255" if fmt == "png" else f"{fmt}_uint8_0_255", fmt, "uint8", 255)


def write_mask(
    path: str, mask: Any, fmt: str = "png", durable: bool = True, encoding: str = "uint8"
) -> str:
    """Write a binary mask atomically and return its encoding name.

    Args:
        path: destination; its extension is not checked (see ``MASK_EXTENSIONS``).
        mask: :math:`(H, W)` boolean (or 0/1) array or tensor; leading size-1 dims are dropped.
        fmt: ``"png"`` (8-bit grayscale), ``"npy"`` or ``"npz"`` (compressed, key ``mask``).
        durable: fsync the file and its folder (see :func:`atomic_write_bytes`).
        encoding: ``"uint8"`` (default, every format: 0 and 255, a stable encoding
            whatever reads it: ``"png_0_255"``, ``"npy_uint8_0_255"``,
            ``"npz_uint8_0_255"``) or ``"bool"`` (``.npy``/``.npz`` only: ``"npy_bool"``,
            ``"npz_bool"``). :func:`mask_encoding` gives the dtype and values.

    Returns:
        the encoding name, for the record that points at the file.

    Example:
        >>> import numpy as np, os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "m.npy")
        >>> write_mask(p, np.eye(3, dtype=bool), "npy")
        'npy_uint8_0_255'
        >>> np.load(p).tolist()
        [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    """
    enc = mask_encoding(fmt, encoding)
    m = _mask_hw(mask)
    stored = m if enc.dtype == "bool" else m.astype(np.uint8) * np.uint8(255)
    buf = io.BytesIO()
    if fmt == "png":
        from PIL import Image

        Image.fromarray(stored, mode="L").save(buf, format="PNG")
    elif fmt == "npy":
        np.save(buf, stored, allow_pickle=False)
    else:
        np.savez_compressed(buf, mask=stored)
    atomic_write_bytes(path, buf.getvalue(), durable=durable)
    return enc.name


def read_mask(path: str) -> np.ndarray:
    """Read a mask written by :func:`write_mask` (any encoding) as ``bool`` (H, W).

    Raises:
        FileNotFoundError: the file does not exist.
        InputError: not a mask file: another extension, shape, dtype, or values other
            than 0 and 255 (``uint8``) or 0 and 1 (``bool``).
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".png":
        with _open_image(path, None, "error") as img:
            if img.mode != "L":
                raise InputError(path, "unreadable", f"mask PNG must be mode L, got {img.mode}")
            img.load()
            a = np.asarray(img)
    elif ext == ".npy":
        a = _read_npy(path, None, real=False)
    elif ext == ".npz":
        with _open_regular(path) as f, np.load(f, allow_pickle=False) as z:
            if "mask" not in z.files:
                raise InputError(path, "unreadable", f"expected key 'mask', got {z.files}")
            a = z["mask"]
    else:
        raise InputError(path, "unreadable", f"unsupported mask extension {ext!r}")
    if a.ndim != 2:
        raise InputError(path, "bad_shape", f"mask must have shape (H, W), got {list(a.shape)}")
    if a.dtype == np.bool_:
        return a
    if a.dtype != np.uint8 or not np.isin(a, (0, 255)).all():
        raise InputError(
            path, "unreadable", f"mask must be bool or uint8 0/255, got dtype {a.dtype}"
        )
    return a == 255


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
