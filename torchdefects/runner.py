"""Batch defects over a folder of anomaly maps or images: the library behind ``torchdefects run``.

One record per input goes to ``results.jsonl`` (docs/schema.md), in input order, with
optional mask files, overlays and a ``regions.jsonl``. The work is split so that the
device never waits on the disk:

- **loading**: a :class:`torch.utils.data.DataLoader` (``num_workers`` processes, pinned
  memory on CUDA) reads and validates files; a file that cannot be used becomes an error
  record there, the others go on;
- **compute**: maps of the same size in a loader batch are stacked and run through one
  :class:`~torchdefects.head.DefectHead` call on the device (maps of different sizes in a
  batch make one sub-batch per size, so every map gets exactly the result the head gives
  it alone; no padding is involved);
- **writing**: a background thread writes masks and overlays (atomically, temp file then
  rename) and then appends the batch's JSON lines and flushes them, so a record is only
  ever written after the files it points to.

Resuming: ``resume=True`` skips every input that already has a record (success or error)
and cuts a torn last line, so a run killed at any point and resumed ends with exactly one
record per input.

Many processes: with ``WORLD_SIZE > 1`` in the environment (``torchrun``), rank ``R`` takes
inputs ``R, R + WORLD_SIZE, ...`` of the sorted list, writes ``results.rank{R}.jsonl``, and
rank 0 merges all of them in input order into ``results.jsonl`` after a barrier
(``torch.distributed`` with the gloo backend, which only carries the barrier).
"""

import dataclasses
import json
import math
import os
import queue
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from torchdefects import files as tdio
from torchdefects._check import check_device
from torchdefects.config import DefectsConfig

__all__ = [
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "EXIT_USAGE",
    "ImageSpace",
    "RunOptions",
    "RunSummary",
    "RunUsageError",
    "run",
]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3

#: DefectsConfig fields that ``RunOptions.overrides`` may set.
OVERRIDABLE = (
    "roi_xyxy_norm",
    "open_ksize",
    "close_ksize",
    "fill_holes",
    "min_area",
    "max_regions",
    "connectivity",
)

#: Extra file of a TorchScript detector with its preprocessing (``input_size``, ``mean``,
#: ``std``, ``center_crop``); flags override it.
PREPROCESS_EXTRA_FILE = "torchdefects/preprocess.json"


class RunUsageError(ValueError):
    """The options cannot work together (``torchdefects run`` exits with 2)."""


@dataclasses.dataclass
class RunOptions:
    """Everything ``torchdefects run`` does; the CLI fills it from the flags the user passed.

    Args:
        out: output folder.
        maps: anomaly maps, a folder or a glob (exclusive with ``images``).
        images: images, a folder or a glob; needs ``detector``.
        detector: TorchScript file of a detector taking :math:`(B, 3, H, W)` float images.
        map_output: which output of the detector is the map when it returns a tuple (index)
            or a dict (key); ``None`` takes a tensor as it is, or a single-entry tuple/dict.
        input_size: ``(H, W)`` the images are resized to for the detector.
        mean, std: per-channel normalization after scaling to [0, 1].
        center_crop: resize to cover ``input_size`` keeping the aspect ratio, then center
            crop (else a plain resize). Also says how maps relate to ``image_size``.
        config: config file (``None``: defaults of :class:`DefectsConfig`).
        category: category whose overrides apply.
        overrides: :class:`DefectsConfig` fields set by the user; they win over the config.
        pixel_threshold: explicit threshold; wins over the config.
        save_masks: ``"png"``, ``"npy"``, ``"npz"``, ``"config"`` (the config file's mask
            format, else png) or ``None``.
        mask_space: ``"anomaly_map"`` or ``"image"`` (needs a known image size).
        save_overlays: write a PNG picture per input under ``overlays/``.
        regions_jsonl: also write ``regions.jsonl``, one line per region.
        image_size: ``(H, W)`` of the original images the maps belong to (``--maps`` only).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: inputs per loader batch.
        num_workers: loader processes (0 reads in the main process).
        resume: skip inputs already recorded in ``out``.
        overwrite: start over when ``out`` already holds results.
        progress: ``None`` = an updating line on a TTY, log lines otherwise.
        quiet: no progress output (the summary line is still printed).
    """

    out: str
    maps: Optional[str] = None
    images: Optional[str] = None
    detector: Optional[str] = None
    map_output: Optional[Union[int, str]] = None
    input_size: Optional[Tuple[int, int]] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    center_crop: Optional[bool] = None
    config: Optional[str] = None
    category: Optional[str] = None
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    pixel_threshold: Optional[float] = None
    save_masks: Optional[str] = None
    mask_space: str = "anomaly_map"
    save_overlays: bool = False
    regions_jsonl: bool = False
    image_size: Optional[Tuple[int, int]] = None
    device: str = "auto"
    batch_size: int = 16
    num_workers: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: Optional[bool] = None
    quiet: bool = False


@dataclasses.dataclass
class RunSummary:
    """What a run did. ``exit_code`` is 0 when every input of the run has a successful
    record and 3 when some have an error record (from this run or, with resume, an
    earlier one)."""

    total: int
    processed: int
    skipped: int
    errors: int
    regions: int
    seconds: float
    results_path: str
    exit_code: int

    def line(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"torchdefects run: {self.total} inputs, {self.processed} processed, "
            f"{self.skipped} skipped (already recorded), {self.errors} errors, "
            f"{self.regions} regions, {self.seconds:.1f} s ({rate:.1f} items/s); "
            f"results in {self.results_path}"
        )


# ----------------------------------------------------------------------------
# Image space
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageSpace:
    """How anomaly-map pixels relate to the original image.

    ``resize``: the map covers the whole image, stretched. ``resize_center_crop``: the
    image was resized by the same factor on both axes to ``resized`` (height, width) so
    that it covers ``input_size``, then the center ``input_size`` was cut out at
    ``crop_offset_xy`` (``(resized - input_size) // 2``); the map covers that crop.
    """

    map_size: Tuple[int, int]
    image_size: Tuple[int, int]
    method: str = "resize"
    input_size: Optional[Tuple[int, int]] = None
    resized: Optional[Tuple[int, int]] = None
    crop_offset_xy: Optional[Tuple[int, int]] = None

    @staticmethod
    def make(
        map_size: Sequence[int],
        image_size: Sequence[int],
        center_crop: bool,
        input_size: Optional[Sequence[int]] = None,
    ) -> "ImageSpace":
        ms = (int(map_size[0]), int(map_size[1]))
        ims = (int(image_size[0]), int(image_size[1]))
        if not center_crop:
            return ImageSpace(ms, ims)
        ins = ms if input_size is None else (int(input_size[0]), int(input_size[1]))
        resized = _cover_size(ims, ins)
        off = ((resized[1] - ins[1]) // 2, (resized[0] - ins[0]) // 2)
        return ImageSpace(ms, ims, "resize_center_crop", ins, resized, off)

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"method": self.method, "image_size": list(self.image_size)}
        if self.method == "resize_center_crop":
            d["input_size"] = list(self.input_size or ())
            d["resized_size"] = list(self.resized or ())
            d["crop_offset_xy"] = list(self.crop_offset_xy or ())
        return d

    def _x_to_image(self, x: float, axis: int) -> float:
        """A map coordinate (continuous, pixel edges at integers) in image coordinates."""
        m = self.map_size[axis]
        img = self.image_size[axis]
        if self.method == "resize":
            return x * img / m
        assert self.input_size and self.resized and self.crop_offset_xy
        off = self.crop_offset_xy[1 - axis]
        return (x * self.input_size[axis] / m + off) * img / self.resized[axis]

    def bbox_to_image(self, bbox_xyxy: Sequence[int]) -> List[int]:
        """Inclusive map-pixel box -> inclusive image-pixel box covering it."""
        x1, y1, x2, y2 = (int(v) for v in bbox_xyxy)
        h, w = self.image_size

        def span(a: int, b: int, axis: int, size: int) -> Tuple[int, int]:
            lo = math.floor(self._x_to_image(a, axis) + 1e-9)
            hi = math.ceil(self._x_to_image(b + 1, axis) - 1e-9) - 1
            lo = min(max(lo, 0), size - 1)
            hi = min(max(hi, lo), size - 1)
            return lo, hi

        ix1, ix2 = span(x1, x2, 1, w)
        iy1, iy2 = span(y1, y2, 0, h)
        return [ix1, iy1, ix2, iy2]

    def mask_to_image(self, mask: np.ndarray) -> np.ndarray:
        """Map-space bool mask -> image-space bool mask, nearest (pixel centres)."""
        h, w = self.image_size
        rows = self._index(h, 0)
        cols = self._index(w, 1)
        out = np.zeros((h, w), dtype=bool)
        r_ok = rows >= 0
        c_ok = cols >= 0
        out[np.ix_(r_ok, c_ok)] = mask[np.ix_(rows[r_ok], cols[c_ok])]
        return out

    def _index(self, n: int, axis: int) -> np.ndarray:
        m = self.map_size[axis]
        centers = np.arange(n, dtype=np.float64) + 0.5
        if self.method == "resize":
            idx = np.floor(centers * m / n)
        else:
            assert self.input_size and self.resized and self.crop_offset_xy
            off = self.crop_offset_xy[1 - axis]
            inp = centers * self.resized[axis] / n - off
            idx = np.floor(inp * m / self.input_size[axis])
            idx[(inp < 0) | (inp >= self.input_size[axis])] = -1
        idx = np.where(idx >= m, m - 1, idx)
        return idx.astype(np.int64)


def _cover_size(image_size: Tuple[int, int], input_size: Tuple[int, int]) -> Tuple[int, int]:
    """Size of ``image_size`` scaled by one factor to cover ``input_size``."""
    h, w = image_size
    s = max(input_size[0] / h, input_size[1] / w)
    return (max(input_size[0], round(h * s)), max(input_size[1], round(w * s)))


# ----------------------------------------------------------------------------
# Loading (runs in DataLoader workers)
# ----------------------------------------------------------------------------


def _classify_read_error(e: BaseException) -> str:
    msg = str(e)
    if isinstance(e, FileNotFoundError):
        return "file_not_found"
    if "must have shape" in msg:
        return "bad_shape"
    if "is empty" in msg:
        return "empty_map"
    return "unreadable"


@dataclasses.dataclass(frozen=True)
class _Preprocess:
    input_size: Optional[Tuple[int, int]]
    mean: Optional[Tuple[float, ...]]
    std: Optional[Tuple[float, ...]]
    center_crop: bool


class _InputDataset(torch.utils.data.Dataset):
    """Reads one input; never raises for a bad file (the item carries the error)."""

    def __init__(
        self,
        paths: Sequence[str],
        indices: Sequence[int],
        kind: str,
        prep: Optional[_Preprocess],
        keep_source: bool,
    ) -> None:
        self.paths = list(paths)
        self.indices = list(indices)
        self.kind = kind
        self.prep = prep
        self.keep_source = keep_source

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item: Dict[str, Any] = {"index": self.indices[i], "error": None}
        path = self.paths[i]
        try:
            if self.kind == "maps":
                a = tdio.read_map(path)
                if a.ndim != 2:
                    item["error"] = ("bad_shape", f"{path}: map must be 2-D, got {list(a.shape)}")
                    return item
                if a.size == 0:
                    item["error"] = ("empty_map", f"{path}: map is empty, shape {list(a.shape)}")
                    return item
                nan = int(np.isnan(a).sum())
                if nan:
                    item["error"] = ("nan_map", f"{path}: map holds {nan} NaN pixels of {a.size}")
                    return item
                item["tensor"] = torch.from_numpy(a if a.flags.writeable else a.copy())
                item["image_size"] = None
                if self.keep_source:
                    item["source"] = a
            else:
                img = tdio.read_image(path)
                if img.shape[0] == 0 or img.shape[1] == 0:
                    item["error"] = ("empty_map", f"{path}: image is empty")
                    return item
                item["tensor"] = _preprocess_image(img, self.prep)
                item["image_size"] = (int(img.shape[0]), int(img.shape[1]))
                if self.keep_source:
                    item["source"] = img
        except Exception as e:
            item["error"] = (_classify_read_error(e), str(e))
        return item


def _preprocess_image(img: np.ndarray, prep: Optional[_Preprocess]) -> Tensor:
    from PIL import Image

    pic = Image.fromarray(img, mode="RGB")
    if prep is not None and prep.input_size is not None:
        ih, iw = prep.input_size
        if prep.center_crop:
            rh, rw = _cover_size((img.shape[0], img.shape[1]), (ih, iw))
            pic = pic.resize((rw, rh), Image.BILINEAR)
            ox, oy = (rw - iw) // 2, (rh - ih) // 2
            pic = pic.crop((ox, oy, ox + iw, oy + ih))
        elif (ih, iw) != (img.shape[0], img.shape[1]):
            pic = pic.resize((iw, ih), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(pic, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1)
    if prep is not None and prep.mean is not None:
        x = x - torch.tensor(prep.mean, dtype=torch.float32).view(-1, 1, 1)
    if prep is not None and prep.std is not None:
        x = x / torch.tensor(prep.std, dtype=torch.float32).view(-1, 1, 1)
    return x.contiguous()


def _collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Errors apart; the rest stacked per tensor shape (one head call per shape)."""
    errors = [(it["index"], it["error"][0], it["error"][1]) for it in items if it["error"]]
    groups: Dict[Tuple[int, ...], Dict[str, Any]] = {}
    for it in items:
        if it["error"]:
            continue
        key = tuple(it["tensor"].shape)
        g = groups.setdefault(key, {"indices": [], "tensors": [], "image_sizes": [], "sources": []})
        g["indices"].append(it["index"])
        g["tensors"].append(it["tensor"])
        g["image_sizes"].append(it["image_size"])
        g["sources"].append(it.get("source"))
    out = []
    for g in groups.values():
        tensors = g.pop("tensors")
        g["batch"] = torch.stack(tensors)
        out.append(g)
    return {"errors": errors, "groups": out}


# ----------------------------------------------------------------------------
# Writing (background thread)
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    index: int
    record: Dict[str, Any]
    mask: Optional[np.ndarray] = None  # map space
    mask_rel: Optional[str] = None
    space: Optional[ImageSpace] = None
    overlay_rel: Optional[str] = None
    source: Optional[np.ndarray] = None  # image (H, W, 3) or map (H, W)
    source_is_image: bool = False


class _Writer:
    """Writes masks/overlays, then appends the batch's lines (one flush per batch)."""

    def __init__(
        self,
        out: str,
        results_name: str,
        regions_name: Optional[str],
        mask_format: Optional[str],
        mask_space: str,
    ) -> None:
        self.out = out
        self.mask_format = mask_format
        self.mask_space = mask_space
        self.results_path = os.path.join(out, results_name)
        self.regions_path = os.path.join(out, regions_name) if regions_name else None
        self._results = open(self.results_path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115
        self._regions = (
            open(self.regions_path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115
            if self.regions_path
            else None
        )
        self._queue: queue.Queue[Optional[List[_Job]]] = queue.Queue(maxsize=4)
        self._error: Optional[BaseException] = None
        self.errors = 0
        self.regions = 0
        self._thread = threading.Thread(target=self._loop, name="torchdefects-writer", daemon=True)
        self._thread.start()

    def put(self, jobs: List[_Job]) -> None:
        if self._error is not None:
            raise RuntimeError("the writer thread failed") from self._error
        self._queue.put(jobs)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._results.close()
        if self._regions is not None:
            self._regions.close()
        if self._error is not None:
            raise RuntimeError("the writer thread failed") from self._error

    def _loop(self) -> None:
        while True:
            jobs = self._queue.get()
            if jobs is None:
                return
            if self._error is not None:
                continue  # drain so that put() never blocks forever
            try:
                self._write(jobs)
            except BaseException as e:
                self._error = e

    def _write(self, jobs: List[_Job]) -> None:
        lines = []
        region_lines = []
        for job in jobs:
            rec = job.record
            if "defects" in rec:
                try:
                    self._write_files(job)
                except Exception as e:
                    rec = {
                        "input": rec["input"],
                        "error": {"type": "write_error", "message": f"{type(e).__name__}: {e}"},
                    }
            if "error" in rec:
                self.errors += 1
            else:
                regions = rec["defects"]["regions"]
                self.regions += len(regions)
                for r in regions:
                    region_lines.append(_dumps({"input": rec["input"], **r}))
            lines.append(_dumps(rec))
        # Regions first: a results line exists only when everything of that input is out.
        if self._regions is not None and region_lines:
            self._regions.write("".join(s + "\n" for s in region_lines))
            self._regions.flush()
        self._results.write("".join(s + "\n" for s in lines))
        self._results.flush()

    def _write_files(self, job: _Job) -> None:
        d = job.record["defects"]
        if job.mask_rel is not None and job.mask is not None and self.mask_format:
            m = job.mask
            space = "anomaly_map"
            if self.mask_space == "image" and job.space is not None:
                m = job.space.mask_to_image(m)
                space = "image"
            # Not fsync-ed: atomic against a kill, as the JSONL it is recorded in.
            path = os.path.join(self.out, job.mask_rel)
            enc = tdio.write_mask(path, m, self.mask_format, durable=False)
            d["mask"] = {
                "path": job.mask_rel,
                "encoding": enc,
                "shape": [int(m.shape[0]), int(m.shape[1])],
                "space": space,
            }
        if job.overlay_rel is not None and job.source is not None:
            from torchdefects.overlay import render_overlay

            regions = d["regions"]
            if job.source_is_image:
                mask = job.mask
                boxes = [r["bbox_xyxy"] for r in regions]
                if job.space is not None and mask is not None:
                    mask = job.space.mask_to_image(mask)
                    boxes = [job.space.bbox_to_image(b) for b in boxes]
                pic = render_overlay(
                    image=job.source,
                    mask=mask,
                    boxes_xyxy=boxes,
                    scores=[r["score_max"] for r in regions],
                    ids=[r["id"] for r in regions],
                    threshold=d["pixel_threshold"],
                )
            else:
                pic = render_overlay(
                    anomaly_map=job.source,
                    mask=job.mask,
                    boxes_xyxy=[r["bbox_xyxy"] for r in regions],
                    scores=[r["score_max"] for r in regions],
                    ids=[r["id"] for r in regions],
                    threshold=d["pixel_threshold"],
                )
            import io as _io

            buf = _io.BytesIO()
            pic.save(buf, format="PNG")
            tdio.atomic_write_bytes(
                os.path.join(self.out, job.overlay_rel), buf.getvalue(), durable=False
            )


def _dumps(obj: Dict[str, Any]) -> str:
    return json.dumps(tdio.json_safe(obj), allow_nan=False, separators=(",", ":"))


# ----------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------


class _Progress:
    def __init__(self, total: int, enabled: bool, tty: Optional[bool]) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.start = time.perf_counter()
        self.last = 0.0
        self.done = 0
        self.errors = 0

    def update(self, done: int, errors: int) -> None:
        self.done += done
        self.errors += errors
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and now - self.last < 5.0 and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        msg = f"{self.done}/{self.total} inputs, {rate:.1f} items/s, {self.errors} errors"
        if self.tty:
            sys.stderr.write("\r" + msg + "\x1b[K")
        else:
            sys.stderr.write("torchdefects run: " + msg + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    try:
        return check_device(spec, local_rank)
    except ValueError as e:
        raise RunUsageError(str(e)) from e


def _settings(opts: RunOptions) -> Tuple[DefectsConfig, float, Dict[str, Any], Optional[str]]:
    """(config with overrides, threshold, its provenance, config mask format)."""
    from torchdefects.calibration import resolve_pixel_threshold
    from torchdefects.config import load_config

    mask_format: Optional[str] = None
    if opts.config is not None:
        try:
            loaded = load_config(opts.config, opts.category)
        except (ValueError, TypeError, OSError) as e:
            raise RunUsageError(f"--config {opts.config}: {e}") from e
        except Exception as e:
            if type(e).__name__ != "ConfigError":
                raise
            raise RunUsageError(f"--config {opts.config}: {e}") from e
        cfg, mask_format = _unpack_loaded(loaded)
    else:
        if opts.category is not None:
            raise RunUsageError("--category needs --config")
        cfg = DefectsConfig()
    unknown = sorted(set(opts.overrides) - set(OVERRIDABLE))
    if unknown:
        raise RunUsageError(f"cannot override {', '.join(unknown)}")
    try:
        cfg = dataclasses.replace(cfg, **opts.overrides)
    except (TypeError, ValueError) as e:
        raise RunUsageError(str(e)) from e
    try:
        threshold, provenance = resolve_pixel_threshold(opts.pixel_threshold, cfg, opts.config)
    except ValueError as e:
        raise RunUsageError(str(e)) from e
    cfg = dataclasses.replace(cfg, pixel_threshold=float(threshold))
    return cfg, float(threshold), provenance, mask_format


def _unpack_loaded(loaded: Any) -> Tuple[DefectsConfig, Optional[str]]:
    """(config, mask format) from what load_config returns: a config, or a bundle."""
    if isinstance(loaded, DefectsConfig):
        return loaded, getattr(loaded, "mask_format", None)
    cfg = getattr(loaded, "config", None) or getattr(loaded, "defects", None)
    if cfg is None and isinstance(loaded, tuple):
        cfg = loaded[0]
    return cfg, getattr(loaded, "mask_format", None) or getattr(cfg, "mask_format", None)


def _load_detector(path: str, device: torch.device) -> Tuple[Any, Dict[str, Any]]:
    extra = {PREPROCESS_EXTRA_FILE: ""}
    try:
        det = torch.jit.load(path, map_location=device, _extra_files=extra)
    except Exception as e:
        raise RunUsageError(f"--detector {path}: cannot load TorchScript: {e}") from e
    meta: Dict[str, Any] = {}
    if extra[PREPROCESS_EXTRA_FILE]:
        try:
            meta = json.loads(extra[PREPROCESS_EXTRA_FILE])
        except ValueError as e:
            raise RunUsageError(f"--detector {path}: bad {PREPROCESS_EXTRA_FILE}: {e}") from e
    det.eval()
    return det, meta


def _select_map(out: Any, key: Optional[Union[int, str]]) -> Tensor:
    if isinstance(out, Tensor):
        if key is not None and not isinstance(key, int):
            raise RunUsageError(f"--map-output {key!r}: the detector returns a tensor")
        return out
    if isinstance(out, dict):
        if key is None:
            if len(out) != 1:
                raise RunUsageError(
                    f"the detector returns a dict with keys {sorted(out)}; pick one with "
                    "--map-output KEY"
                )
            return next(iter(out.values()))
        if str(key) not in out:
            raise RunUsageError(f"--map-output {key!r}: the detector's keys are {sorted(out)}")
        return out[str(key)]
    if isinstance(out, (tuple, list)):
        if key is None:
            if len(out) != 1:
                raise RunUsageError(
                    f"the detector returns {len(out)} outputs; pick one with --map-output INDEX"
                )
            return out[0]
        if not isinstance(key, int) or not -len(out) <= key < len(out):
            raise RunUsageError(
                f"--map-output {key!r}: the detector returns {len(out)} outputs (index them)"
            )
        return out[key]
    raise RunUsageError(f"the detector returned {type(out).__name__}, not a tensor/tuple/dict")


# ----------------------------------------------------------------------------
# Inputs and names
# ----------------------------------------------------------------------------


def _list(opts: RunOptions) -> Tuple[str, List[str], str]:
    if (opts.maps is None) == (opts.images is None):
        raise RunUsageError("give exactly one of --maps or --images")
    if opts.images is not None and opts.detector is None:
        raise RunUsageError("--images needs --detector MODEL.pt")
    if opts.maps is not None and opts.detector is not None:
        raise RunUsageError("--detector goes with --images, not --maps")
    kind = "maps" if opts.maps is not None else "images"
    spec = opts.maps if opts.maps is not None else opts.images
    exts = tdio.MAP_EXTENSIONS if kind == "maps" else tdio.IMAGE_EXTENSIONS
    try:
        paths = tdio.list_inputs(spec, exts)
    except FileNotFoundError as e:
        raise RunUsageError(str(e)) from e
    return kind, paths, tdio.input_root(spec)


def _output_names(paths: Sequence[str], root: str) -> List[str]:
    names = [tdio.safe_relative_stem(p, root) for p in paths]
    seen: Dict[str, int] = {}
    for n in names:
        seen[n.lower()] = seen.get(n.lower(), 0) + 1
    # Names keep the extension and folders, so they only clash on case-insensitive disks.
    out = []
    for i, n in enumerate(names):
        out.append(n if seen[n.lower()] == 1 else f"{n}~{i}")
    return out


def _recorded(paths: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    rec: Dict[str, Dict[str, Any]] = {}
    for p in paths:
        if os.path.exists(p):
            for r in tdio.read_jsonl(p).records:
                if isinstance(r, dict) and "input" in r:
                    rec.setdefault(r["input"], r)
    return rec


def _cut_torn(path: str) -> None:
    if os.path.exists(path):
        tdio.JsonlWriter(path).close()  # opening cuts a torn last line


def _filter_regions(path: str, keep: set) -> None:
    """Drop region lines of inputs with no results line (written just before a kill)."""
    if not os.path.exists(path):
        return
    lines = tdio.read_jsonl(path).records
    kept = [r for r in lines if r.get("input") in keep]
    if len(kept) != len(lines) or tdio.read_jsonl(path).torn_line is not None:
        tdio.atomic_write_text(path, "".join(_dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------


def run(opts: RunOptions) -> RunSummary:
    """Run the defect head over every input of ``opts``; see the module docstring.

    Returns:
        :class:`RunSummary`; ``exit_code`` is 0 or 3.

    Raises:
        RunUsageError: options that cannot work (the CLI exits with 2).
        ValueError: from the config or the threshold resolution (also exit 2 in the CLI).
    """
    t0 = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    _check_options(opts)
    kind, paths, root = _list(opts)
    names = _output_names(paths, root)
    cfg, threshold, provenance, cfg_mask_format = _settings(opts)
    mask_format = opts.save_masks
    if mask_format == "config":
        mask_format = cfg_mask_format or "png"
    device = _resolve_device(opts.device, local_rank)

    detector = None
    prep: Optional[_Preprocess] = None
    if kind == "images":
        assert opts.detector is not None
        detector, meta = _load_detector(opts.detector, device)
        prep = _preprocess_from(opts, meta)

    from torchdefects.head import DefectHead

    head = DefectHead(cfg).to(device).eval()

    distributed = world > 1
    if distributed:
        _init_distributed()
    os.makedirs(opts.out, exist_ok=True)
    results_name = f"results.rank{rank}.jsonl" if distributed else "results.jsonl"
    regions_name = None
    if opts.regions_jsonl:
        regions_name = f"regions.rank{rank}.jsonl" if distributed else "regions.jsonl"
    final_results = os.path.join(opts.out, "results.jsonl")
    final_regions = os.path.join(opts.out, "regions.jsonl")

    # Starting state: fresh, or resume from what earlier runs recorded.
    if rank == 0:
        _prepare_out(opts, final_results, final_regions)
    if distributed:
        _barrier()
    own_results = os.path.join(opts.out, results_name)
    if distributed and not opts.resume and os.path.exists(own_results):
        os.remove(own_results)
    if distributed and regions_name and not opts.resume:
        with _suppress_missing():
            os.remove(os.path.join(opts.out, regions_name))
    if opts.resume:
        _cut_torn(own_results)
    sources = [final_results] + _rank_files(opts.out, "results")
    recorded = _recorded(sources) if opts.resume else {}
    if opts.resume and regions_name:
        own_regions = os.path.join(opts.out, regions_name)
        own_recorded = set(_recorded([own_results]))
        if not distributed:
            own_recorded = set(recorded)
        _filter_regions(own_regions, own_recorded)

    order = list(range(len(paths)))
    shard = order[rank::world] if distributed else order
    todo = [i for i in shard if paths[i] not in recorded]
    skipped = len(shard) - len(todo)

    keep_source = opts.save_overlays
    dataset = _InputDataset([paths[i] for i in todo], todo, kind, prep, keep_source)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=opts.batch_size,
        shuffle=False,
        num_workers=opts.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    writer = _Writer(opts.out, results_name, regions_name, mask_format, opts.mask_space)
    progress = _Progress(len(todo), not opts.quiet, opts.progress)
    ctx = _Context(
        paths=paths,
        names=names,
        head=head,
        detector=detector,
        map_output=opts.map_output,
        device=device,
        threshold=threshold,
        provenance=provenance,
        opts=opts,
        prep=prep,
        mask_format=mask_format,
    )
    try:
        with torch.inference_mode():
            for batch in loader:
                jobs = _process_batch(ctx, batch)
                writer.put(jobs)
                progress.update(len(jobs), sum(1 for j in jobs if "error" in j.record))
    finally:
        writer.close()
        progress.close()

    if distributed:
        _barrier()
        if rank == 0:
            _merge(opts.out, paths, opts.regions_jsonl)
        _barrier()
        import torch.distributed as dist

        dist.destroy_process_group()

    # Final tally over this process's share of the inputs, as recorded on disk.
    if not distributed or rank == 0:
        final = _recorded([final_results])
        mine = paths
    else:
        final = _recorded([own_results] + [final_results])
        mine = [paths[i] for i in shard]
    errors = sum(1 for p in mine if p in final and "error" in final[p])
    missing = sum(1 for p in mine if p not in final)
    regions = sum(
        len(final[p]["defects"]["regions"]) for p in mine if p in final and "defects" in final[p]
    )
    code = EXIT_OK if errors == 0 and missing == 0 else EXIT_SOME_FAILED
    return RunSummary(
        total=len(mine),
        processed=len(todo),
        skipped=skipped,
        errors=errors,
        regions=regions,
        seconds=time.perf_counter() - t0,
        results_path=final_results,
        exit_code=code,
    )


def _check_options(opts: RunOptions) -> None:
    if opts.batch_size < 1:
        raise RunUsageError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.num_workers < 0:
        raise RunUsageError(f"--num-workers must be >= 0, got {opts.num_workers}")
    if opts.save_masks not in (None, "png", "npy", "npz", "config"):
        raise RunUsageError(f"--save-masks must be png, npy or npz, got {opts.save_masks!r}")
    if opts.mask_space not in ("anomaly_map", "image"):
        raise RunUsageError(f"--mask-space must be anomaly_map or image, got {opts.mask_space!r}")
    if opts.mask_space == "image" and opts.images is None and opts.image_size is None:
        raise RunUsageError("--mask-space image needs --images or --image-size H W")
    if opts.image_size is not None and opts.images is not None:
        raise RunUsageError("--image-size goes with --maps; with --images the size is read")
    for name in ("image_size", "input_size"):
        v = getattr(opts, name)
        if v is not None and (len(v) != 2 or min(v) < 1):
            flag = "--" + name.replace("_", "-")
            raise RunUsageError(f"{flag} must be two integers H W >= 1, got {list(v)}")
    if opts.resume and opts.overwrite:
        raise RunUsageError("--resume and --overwrite exclude each other")


def _preprocess_from(opts: RunOptions, meta: Dict[str, Any]) -> _Preprocess:
    size = opts.input_size if opts.input_size is not None else meta.get("input_size")
    mean = opts.mean if opts.mean is not None else meta.get("mean")
    std = opts.std if opts.std is not None else meta.get("std")
    crop = opts.center_crop if opts.center_crop is not None else bool(meta.get("center_crop"))
    if crop and size is None:
        raise RunUsageError("--center-crop needs --input-size H W (or the detector's metadata)")
    return _Preprocess(
        tuple(int(v) for v in size) if size is not None else None,  # type: ignore[arg-type]
        tuple(float(v) for v in mean) if mean is not None else None,
        tuple(float(v) for v in std) if std is not None else None,
        crop,
    )


def _prepare_out(opts: RunOptions, results: str, regions: str) -> None:
    leftovers = [results] + _rank_files(opts.out, "results")
    if opts.resume:
        _cut_torn(results)
        if opts.regions_jsonl:
            _filter_regions(regions, set(_recorded([results])))
        _sweep_temp_files(opts.out)
        return
    if any(os.path.exists(p) for p in leftovers) and not opts.overwrite:
        raise RunUsageError(
            f"{opts.out} already holds results; pass --resume to continue or --overwrite"
        )
    for p in leftovers + [regions] + _rank_files(opts.out, "regions"):
        with _suppress_missing():
            os.remove(p)


def _sweep_temp_files(out: str) -> None:
    """Remove the temporary files of atomic writes cut short by a kill (``.NAME.*.tmp``)."""
    for sub in ("masks", "overlays"):
        for root, _, files in os.walk(os.path.join(out, sub)):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    with _suppress_missing():
                        os.remove(os.path.join(root, name))


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, e: Any, tb: Any) -> bool:
        return et is not None and issubclass(et, FileNotFoundError)


def _rank_files(out: str, stem: str) -> List[str]:
    if not os.path.isdir(out):
        return []
    names = [
        n
        for n in os.listdir(out)
        if n.startswith(stem + ".rank") and n.endswith(".jsonl") and n[len(stem) + 5 : -6].isdigit()
    ]
    return [os.path.join(out, n) for n in sorted(names)]


@dataclasses.dataclass
class _Context:
    paths: List[str]
    names: List[str]
    head: Any
    detector: Any
    map_output: Optional[Union[int, str]]
    device: torch.device
    threshold: float
    provenance: Dict[str, Any]
    opts: RunOptions
    prep: Optional[_Preprocess]
    mask_format: Optional[str]


def _process_batch(ctx: _Context, batch: Dict[str, Any]) -> List[_Job]:
    jobs: List[_Job] = []
    for index, etype, message in batch["errors"]:
        jobs.append(_error_job(ctx, index, etype, message))
    for g in batch["groups"]:
        try:
            jobs.extend(_run_group(ctx, g))
        except RunUsageError:
            raise
        except Exception as e:
            etype = "detector_error" if ctx.detector is not None else "head_error"
            for index in g["indices"]:
                jobs.append(_error_job(ctx, index, etype, f"{type(e).__name__}: {e}"))
    jobs.sort(key=lambda j: j.index)
    return jobs


def _error_job(ctx: _Context, index: int, etype: str, message: str) -> _Job:
    rec = {"input": ctx.paths[index], "error": {"type": etype, "message": message}}
    return _Job(index=index, record=rec)


def _run_group(ctx: _Context, g: Dict[str, Any]) -> List[_Job]:
    x = g["batch"].to(ctx.device, non_blocking=True)
    if ctx.detector is not None:
        maps = _select_map(ctx.detector(x), ctx.map_output)
        if maps.dim() == 3:
            maps = maps.unsqueeze(1)
        if maps.dim() != 4 or maps.shape[1] != 1 or maps.shape[0] != x.shape[0]:
            raise ValueError(f"the detector's map must be (B, 1, H, W), got {list(maps.shape)}")
        if not maps.is_floating_point():
            maps = maps.float()
    else:
        maps = x.unsqueeze(1)
    d = ctx.head(maps)
    want_masks = ctx.mask_format is not None or ctx.opts.save_overlays
    mask = d.mask[:, 0].cpu().numpy() if want_masks else None
    r = d.regions
    counts = d.num_regions.cpu().tolist()
    bbox = r.bbox_xyxy.cpu().tolist()
    cen = r.centroid_xy.cpu().tolist()
    lab = r.label.cpu().tolist()
    area = r.area.cpu().tolist()
    smax = r.score_max.cpu().tolist()
    smean = r.score_mean.cpu().tolist()
    rmax = d.roi_max.cpu().tolist()
    rmean = d.roi_mean.cpu().tolist()
    h, w = int(maps.shape[2]), int(maps.shape[3])
    opts = ctx.opts
    jobs = []
    start = 0
    for k, index in enumerate(g["indices"]):
        n = int(counts[k])
        img_size = g["image_sizes"][k]
        if img_size is None and opts.image_size is not None:
            img_size = (int(opts.image_size[0]), int(opts.image_size[1]))
        space = None
        if img_size is not None:
            crop = bool(opts.center_crop) if ctx.prep is None else ctx.prep.center_crop
            in_size = opts.input_size if ctx.prep is None else ctx.prep.input_size
            space = ImageSpace.make((h, w), img_size, crop, in_size)
        regions = []
        for j in range(start, start + n):
            reg: Dict[str, Any] = {
                "id": int(lab[j]),
                "bbox_xyxy": [int(v) for v in bbox[j]],
                "area": int(area[j]),
                "centroid_xy": [float(v) for v in cen[j]],
                "score_max": float(smax[j]),
                "score_mean": float(smean[j]),
            }
            if space is not None:
                reg["bbox_xyxy_image"] = space.bbox_to_image(reg["bbox_xyxy"])
            regions.append(reg)
        start += n
        space_json: Dict[str, Any] = {"type": "anomaly_map", "shape": [h, w]}
        if space is not None:
            space_json["to_image"] = space.to_json()
        rec = {
            "input": ctx.paths[index],
            "anomaly_map": {"shape": [h, w]},
            "image_size": list(img_size) if img_size is not None else None,
            "defects": {
                "space": space_json,
                "pixel_threshold": ctx.threshold,
                "pixel_threshold_provenance": ctx.provenance,
                "map_stats_roi": {"max": rmax[k], "mean": rmean[k]},
                "mask": None,
                "regions": regions,
            },
        }
        name = ctx.names[index]
        job = _Job(index=index, record=rec, space=space)
        if mask is not None:
            job.mask = mask[k]
        if ctx.mask_format is not None:
            job.mask_rel = "masks/" + name + tdio.MASK_EXTENSIONS[ctx.mask_format]
        if opts.save_overlays:
            job.overlay_rel = "overlays/" + name + ".png"
            src = g["sources"][k]
            job.source = src
            job.source_is_image = ctx.detector is not None
        jobs.append(job)
    return jobs


# ----------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------


def _init_distributed() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", init_method="env://")


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _merge(out: str, paths: Sequence[str], with_regions: bool) -> None:
    """Rank 0: fold the rank files (and an earlier results.jsonl) into results.jsonl."""
    results = os.path.join(out, "results.jsonl")
    rank_results = _rank_files(out, "results")
    recs = _recorded([results] + rank_results)
    pos = {p: i for i, p in enumerate(paths)}
    ordered = sorted(recs.values(), key=lambda r: (pos.get(r["input"], len(pos)), r["input"]))
    tdio.atomic_write_text(results, "".join(_dumps(r) + "\n" for r in ordered))
    if with_regions:
        regions = os.path.join(out, "regions.jsonl")
        rank_regions = _rank_files(out, "regions")
        lines: List[Dict[str, Any]] = []
        for p in [regions] + rank_regions:
            if os.path.exists(p):
                lines.extend(r for r in tdio.read_jsonl(p).records if r.get("input") in recs)
        # Stable sort keeps each input's regions in their reported order.
        lines.sort(key=lambda r: pos.get(r["input"], len(pos)))
        tdio.atomic_write_text(regions, "".join(_dumps(r) + "\n" for r in lines))
        for p in rank_regions:
            os.remove(p)
    for p in rank_results:
        os.remove(p)
