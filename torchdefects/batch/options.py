"""What a batch run does (:class:`RunOptions`), what it did (:class:`RunSummary`), how it ends.

Each :class:`RunOptions` field carries its help, flag name and group in its metadata; the
``torchdefects run`` flags and the docs table are generated from them
(:mod:`torchdefects._fields`), so a default is written once, here.
"""

import dataclasses
from dataclasses import field
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "RunInterrupted",
    "RunOptions",
    "RunStopped",
    "RunSummary",
    "RunUsageError",
]

# The exit-code table of the command line (docs/cli.md); the run returns 0 or 3 itself.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130  # SIGINT (128 + 2)
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)


class RunUsageError(ValueError):
    """The options cannot work together, or a file they name is unusable (exit 2).

    Raised before the run writes anything, so the corrected command works as typed.
    """


class RunStopped(RuntimeError):
    """The run cannot go on for a reason outside the inputs (a full disk, an I/O error);
    what was written is consistent and ``--resume`` continues it (exit 1)."""


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived; the run stopped cleanly and can be resumed.

    A ``BaseException`` like :class:`KeyboardInterrupt`, so ``except Exception`` in the
    processing code does not swallow it.
    """

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"signal {signum}")
        self.signum = signum


def _int_or_key(text: str) -> Union[int, str]:
    try:
        return int(text)
    except ValueError:
        return text


def _flag(default: Any, help: str, group: str, **more: Any) -> Any:
    """A field with its flag metadata (see :mod:`torchdefects._fields`)."""
    return field(default=default, metadata={"help": help, "group": group, **more})


_IN = "inputs"
_SET = "settings (flags win over the config)"
_OUT = "output"
_EXE = "execution"
_PYI = "pyimgano-compatible"


@dataclasses.dataclass
class RunOptions:
    """Everything a batch run does; ``torchdefects run`` fills it from the flags the user set.

    The help of each field is in its metadata (``torchdefects run --help``, docs/cli.md).
    ``overrides`` holds :class:`~torchdefects.DefectsConfig` fields set by the user; they
    win over the config file.

    Example:
        >>> RunOptions(out="results", maps="maps/", pixel_threshold=0.5).batch_size
        16
    """

    # fmt: off
    out: str = field(metadata={"help": "output folder", "group": _OUT, "metavar": "DIR"})
    maps: Optional[str] = _flag(None, "anomaly maps (.npy .npz .pt .png .tif), a folder or a glob",
                                _IN, metavar="DIR_OR_GLOB")
    images: Optional[str] = _flag(None, "images, with --detector", _IN, metavar="DIR_OR_GLOB")
    detector: Optional[str] = _flag(
        None, "TorchScript (.pt) or ONNX (.onnx) detector for --images", _IN, metavar="MODEL")
    max_pixels: int = _flag(
        2**27, "inputs over this many pixels are error records, checked before decoding "
        "(a fixed default, the same on every machine)", _IN, metavar="N")
    map_output: Optional[Union[int, str]] = _flag(
        None, "the map among the detector's outputs (tuple index or dict key)", _IN,
        metavar="INDEX_OR_KEY", type=_int_or_key)
    input_size: Optional[Tuple[int, int]] = _flag(None, "detector input H W", _IN,
                                                  metavar=("H", "W"))
    mean: Optional[List[float]] = _flag(None, "per-channel mean (images in [0, 1])", _IN)  # noqa: RUF009
    std: Optional[List[float]] = _flag(None, "per-channel std", _IN)  # noqa: RUF009
    center_crop: Optional[bool] = _flag(
        None, "resize to cover the input size, then center crop (else resize)", _IN)
    image_size: Optional[Tuple[int, int]] = _flag(
        None, "original image size of --maps (adds bbox_xyxy_image; allows --mask-space image)",
        _IN, metavar=("H", "W"))
    config: Optional[str] = _flag(None, "config file (JSON; pyimgano infer_config.json works)",
                                  _SET, metavar="FILE", aliases=("--infer-config",))
    category: Optional[str] = _flag(None, "category of the config to use", _SET, metavar="NAME")
    overrides: Dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    pixel_threshold: Optional[float] = _flag(None, "explicit pixel threshold", _SET, metavar="T")
    defects: Optional[bool] = _flag(
        None, "defects on (default, or the config's enabled) or off with --no-defects: "
        "records without defects", _PYI)
    pixel_threshold_strategy: Optional[str] = _flag(
        None, "fixed (--pixel-threshold), infer_config (the config's) or normal_pixel_quantile "
        "(calibrate on --train-dir)", _PYI,
        choices=("fixed", "infer_config", "normal_pixel_quantile"))
    pixel_normal_quantile: Optional[float] = _flag(
        None, "quantile of normal pixels for normal_pixel_quantile (default: the config's, "
        "else 0.999)", _PYI, metavar="Q")
    train_dir: Optional[str] = _flag(
        None, "normal maps (or images, with --detector) calibrated inline", _PYI, metavar="DIR")
    save_masks: Optional[str] = _flag(
        None, "write masks: a format (png, npy, npz) or a folder; no value: OUT/masks in the "
        "config's mask_format", _PYI, nargs="?", const="config", metavar="FORMAT_OR_DIR")
    mask_format: Optional[str] = _flag(
        None, "mask file format (default: the config's mask_format)", _PYI,
        choices=("png", "npy", "npz"))
    save_overlays: Optional[Union[bool, str]] = _flag(
        None, "PNG pictures in OUT/overlays or in DIR", _PYI, nargs="?", const=True,
        metavar="DIR", type=str)
    defects_mask_space: Optional[str] = _flag(
        None, "pyimgano's mask_space, the mask written and outlined: roi (the reported regions) "
        "or full (the whole map's, no ROI gate; records stay ROI-gated)", _PYI,
        choices=("roi", "full"))
    mask_space: str = _flag("anomaly_map", "masks at map size or image size (nearest)", _OUT,
                            choices=("anomaly_map", "image"))
    regions_jsonl: bool = _flag(False, "also OUT/regions.jsonl", _OUT)
    save_maps: Optional[str] = _flag(
        None, "keep the anomaly maps as OUT/maps/NAME.npy (float32), to calibrate or evaluate "
        "on later", _OUT, choices=("npy",))
    report: bool = _flag(
        False, "also OUT/report.html: summary, a table sortable by score, the overlays", _OUT)
    resume: bool = _flag(
        False, "continue a run: skip recorded inputs, retry transient failures", _OUT)
    overwrite: bool = _flag(False, "replace earlier results in OUT", _OUT)
    device: str = _flag("auto", "auto, cpu, cuda or cuda:N", _EXE)
    batch_size: int = _flag(16, "inputs per batch", _EXE)
    num_workers: int = _flag(0, "loader processes", _EXE)
    quiet: bool = _flag(False, "no progress output", _EXE)
    progress: Optional[bool] = field(default=None, metadata={"cli": False})
    # fmt: on


@dataclasses.dataclass
class RunSummary:
    """What a run did, over every rank. ``exit_code`` is 0 when every input has a successful
    record and 3 when some have an error record (from this run or an earlier one)."""

    total: int
    processed: int
    skipped: int
    errors: int
    regions: int
    seconds: float
    results_path: str
    exit_code: int

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"torchdefects run: {self.total} inputs, {self.processed} processed, "
            f"{self.skipped} skipped (already recorded), {self.errors} errors, "
            f"{self.regions} regions, {self.seconds:.1f} s ({rate:.1f} items/s); "
            f"results in {self.results_path}"
        )
