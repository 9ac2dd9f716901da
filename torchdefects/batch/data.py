"""Inputs of a run: listing, output names, the dataset, typed items, collation by shape.

The dataset runs in :class:`torch.utils.data.DataLoader` workers and never raises for a bad
file: the :class:`Item` carries the error, which becomes that input's error record. A loader
batch is collated into one :class:`Group` per tensor shape, so every map gets exactly the
result the head gives it alone (no padding).
"""

import os
import signal
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from torchdefects import files
from torchdefects.batch.options import RunUsageError
from torchdefects.geometry import Preprocess, preprocess_image

__all__ = [
    "Batch",
    "Group",
    "InputDataset",
    "Item",
    "collate",
    "list_run_inputs",
    "output_names",
    "worker_init",
]


class Item(NamedTuple):
    """One input as read: ``tensor`` (map ``(H, W)`` or image ``(3, h, w)``) or ``error``
    (``(type, message)``)."""

    index: int
    tensor: Optional[Tensor]
    image_size: Optional[Tuple[int, int]]
    source: Optional[np.ndarray]
    error: Optional[Tuple[str, str]]


class Group(NamedTuple):
    """Inputs of one loader batch with one tensor shape, stacked: ``batch`` is
    :math:`(G, H, W)` maps or :math:`(G, 3, h, w)` images."""

    indices: List[int]
    batch: Tensor
    image_sizes: List[Optional[Tuple[int, int]]]
    sources: List[Optional[np.ndarray]]


class Batch(NamedTuple):
    """A collated loader batch: ``errors`` as ``(index, type, message)``, then groups."""

    errors: List[Tuple[int, str, str]]
    groups: List[Group]


def _classify_read_error(e: BaseException) -> str:
    msg = str(e)
    if isinstance(e, FileNotFoundError):
        return "file_not_found"
    kind = getattr(e, "kind", None)  # files.InputError says what was wrong
    if kind in ("too_large", "not_regular_file", "bad_shape", "empty_map"):
        return str(kind)
    if "must have shape" in msg:
        return "bad_shape"
    if "is empty" in msg:
        return "empty_map"
    return "unreadable"


class InputDataset(torch.utils.data.Dataset):
    """Item ``i`` reads ``paths[indices[i]]``.

    Args:
        paths: the run's input list.
        indices: the indices of it to read (this rank's inputs still to do).
        kind: ``"maps"`` or ``"images"``.
        prep: detector preprocessing (images only).
        keep_source: also return the array as read (for overlays).
        max_pixels: inputs over this many pixels are refused before decoding.
    """

    def __init__(
        self,
        paths: Sequence[str],
        indices: Sequence[int],
        kind: str,
        prep: Optional[Preprocess],
        keep_source: bool,
        max_pixels: Optional[int] = files.DEFAULT_MAX_PIXELS,
    ) -> None:
        self.max_pixels = max_pixels
        self.paths = paths
        self.indices = indices
        self.kind = kind
        self.prep = prep
        self.keep_source = keep_source

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Item:
        index = int(self.indices[i])
        path = self.paths[index]
        try:
            if self.kind == "maps":
                return self._map(index, path)
            return self._image(index, path)
        except Exception as e:
            return Item(index, None, None, None, (_classify_read_error(e), str(e)))

    def _map(self, index: int, path: str) -> Item:
        a = files.read_map(path, max_pixels=self.max_pixels)
        if a.ndim != 2:
            return Item(index, None, None, None,
                        ("bad_shape", f"{path}: map must be 2-D, got {list(a.shape)}"))  # fmt: skip
        if a.size == 0:
            return Item(index, None, None, None,
                        ("empty_map", f"{path}: map is empty, shape {list(a.shape)}"))  # fmt: skip
        nan = int(np.isnan(a).sum())
        if nan:
            return Item(index, None, None, None,
                        ("nan_map", f"{path}: map holds {nan} NaN pixels of {a.size}"))  # fmt: skip
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
        return Item(index, t, None, a if self.keep_source else None, None)

    def _image(self, index: int, path: str) -> Item:
        img = files.read_image(path, max_pixels=self.max_pixels)
        if img.shape[0] == 0 or img.shape[1] == 0:
            return Item(index, None, None, None, ("empty_map", f"{path}: image is empty"))
        size = (int(img.shape[0]), int(img.shape[1]))
        x = preprocess_image(img, self.prep)
        return Item(index, x, size, img if self.keep_source else None, None)


def collate(items: List[Item]) -> Batch:
    """Errors apart; the rest stacked per tensor shape (one head call per shape)."""
    errors = [(it.index, it.error[0], it.error[1]) for it in items if it.error is not None]
    by_shape: Dict[Tuple[int, ...], List[Item]] = {}
    for it in items:
        if it.error is None:
            assert it.tensor is not None
            by_shape.setdefault(tuple(it.tensor.shape), []).append(it)
    groups = [
        Group(
            [it.index for it in its],
            torch.stack([it.tensor for it in its]),  # type: ignore[misc]
            [it.image_size for it in its],
            [it.source for it in its],
        )
        for its in by_shape.values()
    ]
    return Batch(errors, groups)


def worker_init(_: int) -> None:
    """Loader workers leave Ctrl-C (SIGINT to the whole process group) to the main process,
    which stops them with SIGTERM (their default action: exit at once, no traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # multiprocessing's fd-sharing thread reports through sys.excepthook.
    sys.excepthook = _quiet_disconnect


def _quiet_disconnect(exc_type: Any, value: Any, tb: Any) -> None:
    # A tensor handed over while the main process stops sees the connection reset: that is
    # the stop, not an error worth a traceback.
    if not issubclass(exc_type, (ConnectionError, EOFError)):
        sys.__excepthook__(exc_type, value, tb)


def _inside(path: str, folders: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == f or real.startswith(f + os.sep) for f in folders)


def list_run_inputs(
    spec: str, kind: str, exclude: Sequence[str], flag: str = "--maps"
) -> Tuple[List[str], str]:
    """(sorted input paths, their root). Files under ``exclude`` (the run's own output
    folders) are never inputs, so outputs inside an input folder are not read back.

    Raises:
        RunUsageError: nothing matched.
    """
    exts = files.MAP_EXTENSIONS if kind == "maps" else files.IMAGE_EXTENSIONS
    try:
        paths = files.list_inputs(spec, exts)
    except FileNotFoundError as e:
        raise RunUsageError(f"{flag}: {e}") from e
    folders = [os.path.realpath(f) for f in exclude]
    paths = [p for p in paths if not _inside(p, folders)]
    if not paths:
        raise RunUsageError(f"{flag}: no inputs outside the output folder in {spec!r}")
    return paths, files.input_root(spec)


def output_names(paths: Sequence[str], root: str) -> List[str]:
    """A file-name stem per input, unique even on case-insensitive disks."""
    names = [files.safe_relative_stem(p, root) for p in paths]
    seen: Dict[str, int] = {}
    for n in names:
        seen[n.lower()] = seen.get(n.lower(), 0) + 1
    # Names keep the extension and folders, so they only clash on case-insensitive disks.
    return [n if seen[n.lower()] == 1 else f"{n}~{i}" for i, n in enumerate(names)]
