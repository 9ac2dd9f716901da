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

    out: str = field(metadata={"help": "output folder", "group": _OUT, "metavar": "DIR"})
    maps: Optional[str] = field(
        default=None,
        metadata={"help": "anomaly maps (.npy .npz .pt .png .tif), a folder or a glob",
                  "group": _IN, "metavar": "DIR_OR_GLOB"},
    )  # fmt: skip
    images: Optional[str] = field(
        default=None,
        metadata={"help": "images, with --detector", "group": _IN, "metavar": "DIR_OR_GLOB"},
    )
    detector: Optional[str] = field(
        default=None,
        metadata={"help": "TorchScript detector for --images", "group": _IN,
                  "metavar": "MODEL.pt"},
    )  # fmt: skip
    map_output: Optional[Union[int, str]] = field(
        default=None,
        metadata={"help": "the map among the detector's outputs (tuple index or dict key)",
                  "group": _IN, "metavar": "INDEX_OR_KEY", "type": _int_or_key},
    )  # fmt: skip
    input_size: Optional[Tuple[int, int]] = field(
        default=None,
        metadata={"help": "detector input H W", "group": _IN, "metavar": ("H", "W")},
    )
    mean: Optional[List[float]] = field(
        default=None, metadata={"help": "per-channel mean (images in [0, 1])", "group": _IN}
    )
    std: Optional[List[float]] = field(
        default=None, metadata={"help": "per-channel std", "group": _IN}
    )
    center_crop: Optional[bool] = field(
        default=None,
        metadata={"help": "resize to cover the input size, then center crop (else resize)",
                  "group": _IN},
    )  # fmt: skip
    image_size: Optional[Tuple[int, int]] = field(
        default=None,
        metadata={"help": "original image size of --maps (adds bbox_xyxy_image; allows "
                  "--mask-space image)", "group": _IN, "metavar": ("H", "W")},
    )  # fmt: skip
    config: Optional[str] = field(
        default=None,
        metadata={"help": "config file (JSON; pyimgano infer_config.json works)",
                  "group": _SET, "metavar": "FILE", "aliases": ("--infer-config",)},
    )  # fmt: skip
    category: Optional[str] = field(
        default=None,
        metadata={"help": "category of the config to use", "group": _SET, "metavar": "NAME"},
    )
    overrides: Dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    pixel_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "explicit pixel threshold", "group": _SET, "metavar": "T"},
    )
    defects: Optional[bool] = field(
        default=None,
        metadata={"help": "defects on (default, or the config's enabled) or off with "
                  "--no-defects: records without defects", "group": _PYI},
    )  # fmt: skip
    pixel_threshold_strategy: Optional[str] = field(
        default=None,
        metadata={"help": "fixed (--pixel-threshold), infer_config (the config's) or "
                  "normal_pixel_quantile (calibrate on --train-dir)", "group": _PYI,
                  "choices": ("fixed", "infer_config", "normal_pixel_quantile")},
    )  # fmt: skip
    pixel_normal_quantile: Optional[float] = field(
        default=None,
        metadata={"help": "quantile of normal pixels for normal_pixel_quantile "
                  "(default: the config's, else 0.999)", "group": _PYI, "metavar": "Q"},
    )  # fmt: skip
    train_dir: Optional[str] = field(
        default=None,
        metadata={"help": "normal maps (or images, with --detector) calibrated inline",
                  "group": _PYI, "metavar": "DIR"},
    )  # fmt: skip
    save_masks: Optional[str] = field(
        default=None,
        metadata={"help": "write masks: a format (png, npy, npz) or a folder; no value: "
                  "OUT/masks in the config's mask_format", "group": _PYI, "nargs": "?",
                  "const": "config", "metavar": "FORMAT_OR_DIR"},
    )  # fmt: skip
    mask_format: Optional[str] = field(
        default=None,
        metadata={"help": "mask file format (default: the config's mask_format)",
                  "group": _PYI, "choices": ("png", "npy", "npz")},
    )  # fmt: skip
    save_overlays: Optional[Union[bool, str]] = field(
        default=None,
        metadata={"help": "PNG pictures in OUT/overlays or in DIR", "group": _PYI,
                  "nargs": "?", "const": True, "metavar": "DIR", "type": str},
    )  # fmt: skip
    defects_mask_space: Optional[str] = field(
        default=None,
        metadata={"help": "pyimgano's mask_space: roi (the only one supported: pixels "
                  "outside the ROI are never foreground)", "group": _PYI,
                  "choices": ("roi", "full")},
    )  # fmt: skip
    mask_space: str = field(
        default="anomaly_map",
        metadata={"help": "masks at map size or image size (nearest)", "group": _OUT,
                  "choices": ("anomaly_map", "image")},
    )  # fmt: skip
    regions_jsonl: bool = field(default=False, metadata={"help": "also OUT/regions.jsonl",
                                                         "group": _OUT})  # fmt: skip
    resume: bool = field(
        default=False,
        metadata={"help": "continue a run: skip recorded inputs, retry transient failures",
                  "group": _OUT},
    )  # fmt: skip
    overwrite: bool = field(
        default=False, metadata={"help": "replace earlier results in OUT", "group": _OUT}
    )
    device: str = field(
        default="auto", metadata={"help": "auto, cpu, cuda or cuda:N", "group": _EXE}
    )
    batch_size: int = field(default=16, metadata={"help": "inputs per batch", "group": _EXE})
    num_workers: int = field(default=0, metadata={"help": "loader processes", "group": _EXE})
    quiet: bool = field(default=False, metadata={"help": "no progress output", "group": _EXE})
    progress: Optional[bool] = field(default=None, metadata={"cli": False})


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
