"""The ``torchdefects`` command line: a thin shell over the library.

Usage: ``torchdefects <command> [options]`` or ``python -m torchdefects <command>``.
Commands register themselves through one small function each (see ``_COMMANDS`` at the
bottom); an option the user did not set is absent from the parsed namespace
(``argparse.SUPPRESS``), so only options the user set are forwarded and the library's
defaults stay the single source of truth.

Exit codes:
    0  success.
    1  other failure: an unexpected error, or no input could be used.
    2  usage error: bad arguments, a bad config file, no inputs matched.
    3  some inputs failed; the others were processed and the output written
       (the summary lists the failed inputs).
    130  interrupted (Ctrl-C).
"""

import argparse
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A problem with what the user asked for: exit code 2, message without traceback."""


class CommandFailed(Exception):
    """The command could not do its job: exit code 1, message without traceback."""


# ----------------------------------------------------------------------------
# Helpers shared by commands
# ----------------------------------------------------------------------------


def user_set(args: argparse.Namespace, *names: str) -> Dict[str, Any]:
    """The options among ``names`` that the user set, as a dict (for ``**kwargs``)."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without CUDA is a usage error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return name


class Progress:
    """A one-line progress counter on a terminal; a few plain log lines otherwise.

    No dependency: on a TTY it rewrites one line with ``\\r``; on a pipe or file it logs
    at most every ``log_every_s`` seconds and at the end. ``quiet`` silences it.
    """

    def __init__(
        self, label: str, total: int, quiet: bool = False, stream: Any = None, log_every_s=10.0
    ) -> None:
        self.label = label
        self.total = total
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every_s = log_every_s
        self.start = time.monotonic()
        self._last = 0.0
        self.done = 0

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        if self.quiet:
            return
        now = time.monotonic()
        final = done >= self.total
        if self.tty:
            if final or now - self._last >= 0.1:
                self._last = now
                self.stream.write(f"\r{self._line(now, note)}\x1b[K")
                self.stream.flush()
        elif final or now - self._last >= self.log_every_s:
            self._last = now
            self.stream.write(self._line(now, note) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if not self.quiet and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, now: float, note: str) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = f"{self.label}: {self.done}/{self.total} ({pct:.0f}%) {now - self.start:.1f}s"
        return line + (f" {note}" if note else "")


def _print(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------
# calibrate
# ----------------------------------------------------------------------------


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="pixel threshold from normal anomaly maps (exact quantile), written to a config",
        description=(
            "Compute the pixel threshold as the q-quantile of every ROI pixel of normal "
            "anomaly maps, exactly as numpy.quantile would, streaming the maps in batches; "
            "write it with its provenance into a config file (created or updated)."
        ),
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--maps", required=True, help="folder (recursive) or glob of normal maps")
    g.add_argument(
        "--config", metavar="IN", help="config to start from (default: OUT if it exists)"
    )
    g.add_argument("--category", metavar="NAME", help="write under per_category.NAME.defects")
    g = p.add_argument_group("calibration")
    g.add_argument("--q", type=float, help="quantile in [0, 1] (library default 0.999)")
    g.add_argument(
        "--roi-xyxy-norm",
        nargs=4,
        type=float,
        metavar=("X1", "Y1", "X2", "Y2"),
        help="ROI in [0, 1]; default: the config's roi_xyxy_norm, else the whole map",
    )
    g.add_argument(
        "--nan-policy",
        choices=("raise", "omit"),
        help="maps with NaN pixels: "
        "'raise' (default) reports the file as failed, 'omit' skips those pixels",
    )
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", required=True, metavar="OUT.json", help="config to write")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--batch-size", type=int, default=32, help="maps per batch (default 32)")
    g.add_argument("--quiet", action="store_true", default=False, help="no progress output")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import os

    import numpy as np
    import torch

    from torchdefects.calibration import PixelThresholdCalibrator
    from torchdefects.config import (
        ConfigError,
        load_config,
        read_config_dict,
        save_config,
        set_pixel_threshold,
    )
    from torchdefects.io import MAP_EXTENSIONS, list_inputs, read_map

    quiet = args.quiet
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    try:
        paths = list_inputs(args.maps, MAP_EXTENSIONS)
    except FileNotFoundError as e:
        raise UsageError(f"--maps: {e}") from e

    base_path = getattr(args, "config", None)
    if base_path is None and os.path.exists(args.output):
        base_path = args.output
    try:
        raw = read_config_dict(base_path) if base_path is not None else {"schema_version": 1}
        base = load_config(raw, category=getattr(args, "category", None), missing_category="global")
    except (ConfigError, OSError) as e:
        raise UsageError(str(e)) from e
    roi = getattr(args, "roi_xyxy_norm", None)
    if roi is None:
        roi = base.roi_xyxy_norm
    nan_policy = getattr(args, "nan_policy", "raise")
    try:
        cal = PixelThresholdCalibrator(
            roi_xyxy_norm=roi, nan_policy=nan_policy, **user_set(args, "q")
        )
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e

    failed: List[str] = []
    used: List[str] = []
    progress = Progress("calibrate", len(paths), quiet=quiet)

    def feed(batch: List[np.ndarray]) -> None:
        if batch:
            cal.update(torch.from_numpy(np.stack(batch)).to(device))

    def one_pass(files: List[str], record: bool) -> None:
        batch: List[np.ndarray] = []
        for i, path in enumerate(files):
            try:
                m = read_map(path)
                if nan_policy == "raise":
                    n_nan = cal.count_nan(m)
                    if n_nan:
                        raise ValueError(f"{path}: {n_nan} NaN pixels in the ROI")
            except (OSError, ValueError) as e:
                if not record:
                    raise CommandFailed(f"{path} changed between passes: {e}") from e
                failed.append(f"{path}: {e}" if not str(e).startswith(path) else str(e))
                progress.update(i + 1)
                continue
            if record:
                used.append(path)
            if batch and (batch[0].shape != m.shape or len(batch) >= args.batch_size):
                feed(batch)
                batch = []
            batch.append(m)
            progress.update(i + 1)
        feed(batch)

    one_pass(paths, record=True)
    progress.close()
    if not used:
        listed = "\n  ".join(failed)
        raise CommandFailed(f"none of the {len(paths)} maps could be used:\n  {listed}")
    if not cal.is_exact():
        # The stream's high values shifted late; a second pass with the count known is exact.
        _print("calibrate: second pass over the maps (exact order statistics)", quiet)
        cal.begin_second_pass()
        progress = Progress("calibrate (pass 2)", len(used), quiet=quiet)
        one_pass(used, record=False)
        progress.close()
    threshold, provenance = cal.compute()

    category = getattr(args, "category", None)
    raw = set_pixel_threshold(
        raw,
        threshold,
        provenance,
        category=category,
        roi_xyxy_norm=getattr(args, "roi_xyxy_norm", None),
    )
    try:
        save_config(raw, args.output)
    except ConfigError as e:
        raise CommandFailed(str(e)) from e

    where = f"per_category.{category}.defects" if category else "defects"
    _print(
        f"calibrate: pixel_threshold = {threshold!r} (q={provenance['q']}, "
        f"{provenance['calibration_map_count']} maps, {provenance['roi_pixel_count']} ROI pixels)"
        f" -> {args.output} [{where}]",
        quiet,
    )
    if failed:
        print(
            f"calibrate: {len(failed)} of {len(paths)} maps failed and were left out:",
            file=sys.stderr,
        )
        for f in failed:
            print(f"  {f}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


# ----------------------------------------------------------------------------
# Parser and entry point
# ----------------------------------------------------------------------------

#: One function per command: ``f(subparsers)`` adds its parser and sets ``func``.
#: Add a command by writing ``_add_<name>`` and appending it here.
_COMMANDS: List[Callable[[Any], None]] = [_add_calibrate]


def build_parser(
    commands: Optional[Iterable[Callable[[Any], None]]] = None,
) -> argparse.ArgumentParser:
    from torchdefects import __version__

    parser = argparse.ArgumentParser(
        prog="torchdefects",
        description="Defects (masks and regions) from anomaly maps.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage error, 3 some inputs failed.",
    )
    parser.add_argument("--version", action="version", version=f"torchdefects {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in commands if commands is not None else _COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    prog = f"torchdefects {args.command}"
    try:
        return int(func(args))
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        print(f"{prog}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
