"""Batch runs over folders of anomaly maps or images (``torchdefects run``).

One concept a module:

- :mod:`~torchdefects.batch.options`: :class:`RunOptions`, :class:`RunSummary`, exit codes
  and the run's exceptions;
- :mod:`~torchdefects.batch.data`: listing inputs, the dataset, typed items, collation;
- :mod:`~torchdefects.batch.records`: every record kind, beside the JSON Schema;
- :mod:`~torchdefects.batch.writer`: the background writer;
- :mod:`~torchdefects.batch.journal`: lock, manifest, resume, temp sweep, rank files, merge;
- :mod:`~torchdefects.batch.dist`: ranks under ``torchrun``;
- :mod:`~torchdefects.batch.calibrate`: :func:`calibrate_maps`, the one calibration path;
- :mod:`~torchdefects.batch.plan`: what a run will do, resolved before it writes anything;
- :mod:`~torchdefects.batch.compute`: detector and head on a batch, the OOM retry;
- :mod:`~torchdefects.batch.progress`: the progress line;
- :mod:`~torchdefects.batch.folder`: :func:`run_folder`, which puts them together.

Example:
    >>> from torchdefects.batch import RunOptions, run_folder
    >>> opts = RunOptions(out="out", maps="maps/", pixel_threshold=0.5)
    >>> summary = run_folder(opts)  # doctest: +SKIP
"""

from torchdefects.batch.calibrate import CalibrationFailed, CalibrationResult, calibrate_maps
from torchdefects.batch.folder import PREPROCESS_EXTRA_FILE, run_folder
from torchdefects.batch.options import (
    RunInterrupted,
    RunOptions,
    RunStopped,
    RunSummary,
    RunUsageError,
)

__all__ = [
    "PREPROCESS_EXTRA_FILE",
    "CalibrationFailed",
    "CalibrationResult",
    "RunInterrupted",
    "RunOptions",
    "RunStopped",
    "RunSummary",
    "RunUsageError",
    "calibrate_maps",
    "run_folder",
]
