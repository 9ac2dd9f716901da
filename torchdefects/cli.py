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
    """``--device`` to a device name (see ``_check.check_device``); bad values are usage errors."""
    from torchdefects._check import check_device

    try:
        return str(check_device(name))
    except ValueError as e:
        raise UsageError(str(e)) from e


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
        self._last = self.start
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
        read_config_dict,
        save_config,
        set_pixel_threshold,
        validate_config_dict,
    )
    from torchdefects.files import MAP_EXTENSIONS, list_inputs, read_map

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
    category = getattr(args, "category", None)
    try:
        raw = read_config_dict(base_path) if base_path is not None else {"schema_version": 1}
        configs = validate_config_dict(raw, base_path)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    # A new category starts from the global block, as load_config will merge it.
    base = configs.get(category, configs[""]) if category else configs[""]
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
# run
# ----------------------------------------------------------------------------

#: ``run`` flag (namespace name) -> DefectsConfig field it overrides.
_RUN_OVERRIDES = {
    "roi_xyxy_norm": "roi_xyxy_norm",
    "defect_open_ksize": "open_ksize",
    "defect_close_ksize": "close_ksize",
    "defect_fill_holes": "fill_holes",
    "defect_min_area": "min_area",
    "defect_max_regions": "max_regions",
    "connectivity": "connectivity",
}


def _int_or_key(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def _max_regions(text: str) -> Optional[int]:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or none, got {text!r}") from None


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="defects for a folder of anomaly maps or images: results.jsonl, masks, overlays",
        description=(
            "Run the defect head over every input, batched on the device; write one JSON "
            "record per input to OUT/results.jsonl in input order (see docs/schema.md), and "
            "optionally masks, overlays and regions.jsonl. Flags override the config file only "
            "when given."
        ),
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--maps", metavar="DIR_OR_GLOB", help="anomaly maps (.npy .npz .pt .png .tif)")
    g.add_argument("--images", metavar="DIR_OR_GLOB", help="images, with --detector")
    g.add_argument("--detector", metavar="MODEL.pt", help="TorchScript detector for --images")
    g.add_argument(
        "--map-output",
        type=_int_or_key,
        metavar="INDEX_OR_KEY",
        help="the map among the detector's outputs (tuple index or dict key)",
    )
    g.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="detector input")
    g.add_argument("--mean", nargs="+", type=float, help="per-channel mean (images in [0, 1])")
    g.add_argument("--std", nargs="+", type=float, help="per-channel std")
    g.add_argument(
        "--center-crop",
        action="store_true",
        help="resize to cover the input size, then center crop (else plain resize)",
    )
    g.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="original image size of --maps (adds bbox_xyxy_image; allows --mask-space image)",
    )
    g = p.add_argument_group("settings (flags win over the config)")
    g.add_argument("--config", metavar="FILE", help="config file (JSON)")
    g.add_argument("--category", metavar="NAME", help="category of the config to use")
    g.add_argument("--pixel-threshold", type=float, metavar="T", help="explicit pixel threshold")
    g.add_argument(
        "--roi-xyxy-norm", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"), help="ROI"
    )
    g.add_argument("--defect-open-ksize", type=int, metavar="K", help="opening (0 or odd >= 3)")
    g.add_argument("--defect-close-ksize", type=int, metavar="K", help="closing (0 or odd >= 3)")
    g.add_argument(
        "--defect-fill-holes",
        action=argparse.BooleanOptionalAction,
        help="fill holes (--no-defect-fill-holes turns it off)",
    )
    g.add_argument("--defect-min-area", type=int, metavar="N", help="drop smaller regions")
    g.add_argument(
        "--defect-max-regions", type=_max_regions, metavar="N", help="regions kept (or none)"
    )
    g.add_argument("--connectivity", type=int, choices=(4, 8), help="4 or 8")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder")
    g.add_argument(
        "--save-masks",
        nargs="?",
        const="config",
        choices=("png", "npy", "npz", "config"),
        help="write masks under OUT/masks/ (no value: the config's mask_format, else png)",
    )
    g.add_argument(
        "--mask-space",
        choices=("anomaly_map", "image"),
        help="masks at map size (default) or image size (nearest)",
    )
    g.add_argument("--save-overlays", action="store_true", help="PNG pictures in OUT/overlays/")
    g.add_argument("--regions-jsonl", action="store_true", help="also OUT/regions.jsonl")
    g.add_argument("--resume", action="store_true", help="skip inputs already recorded")
    g.add_argument("--overwrite", action="store_true", help="replace earlier results in OUT")
    g = p.add_argument_group("execution")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--batch-size", type=int, help="inputs per batch (default 16)")
    g.add_argument("--num-workers", type=int, help="loader processes (default 0)")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from torchdefects.runner import RunOptions, RunUsageError, run

    direct = user_set(
        args,
        "maps",
        "images",
        "detector",
        "map_output",
        "mean",
        "std",
        "center_crop",
        "config",
        "category",
        "pixel_threshold",
        "save_masks",
        "mask_space",
        "save_overlays",
        "regions_jsonl",
        "device",
        "batch_size",
        "num_workers",
        "resume",
        "overwrite",
        "quiet",
    )
    for name in ("input_size", "image_size"):
        if hasattr(args, name):
            direct[name] = tuple(getattr(args, name))
    overrides = {
        field: v for flag, field in _RUN_OVERRIDES.items() for v in user_set(args, flag).values()
    }
    try:
        summary = run(RunOptions(out=args.out, overrides=overrides, **direct))
    except RunUsageError as e:
        raise UsageError(str(e)) from e
    print(summary.line(), file=sys.stderr)
    return summary.exit_code


# ----------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write the scripted head (or detector + head) with its config embedded",
        description=(
            "Script DefectHead for the config (and category), optionally behind a TorchScript "
            "detector, and save it with the config and threshold provenance embedded; "
            "torch.jit.load reads it without torchdefects."
        ),
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="config file (JSON)")
    p.add_argument("--category", metavar="NAME", help="category of the config to use")
    p.add_argument("--detector", metavar="MODEL.pt", help="TorchScript detector to put in front")
    p.add_argument(
        "--map-output",
        type=_int_or_key,
        metavar="INDEX_OR_KEY",
        help="the map among the detector's outputs (tuple index or dict key)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt", help="file to write")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from torchdefects.config import ConfigError, load_config
    from torchdefects.export import attach, save_scripted
    from torchdefects.head import DefectHead

    try:
        cfg = load_config(args.config, getattr(args, "category", None))
    except (ConfigError, OSError) as e:
        raise UsageError(str(e)) from e
    module: Any = DefectHead(cfg)
    what = "DefectHead"
    if hasattr(args, "detector"):
        try:
            detector = torch.jit.load(args.detector, map_location="cpu")
        except Exception as e:
            raise UsageError(f"--detector {args.detector}: cannot load TorchScript: {e}") from e
        module = attach(detector, module, output=getattr(args, "map_output", None))
        what = "detector + DefectHead"
    elif hasattr(args, "map_output"):
        raise UsageError("--map-output needs --detector")
    save_scripted(module, args.output, config=cfg, provenance=cfg.pixel_threshold_provenance)
    print(
        f"torchdefects export: {what} (pixel_threshold={cfg.pixel_threshold}) -> {args.output}",
        file=sys.stderr,
    )
    return EXIT_OK


# ----------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole job on made-up textured parts with planted defects (no download)",
        description=(
            "Make normal and defective textured surfaces, fit a patch-Gaussian detector on "
            "the normal ones, calibrate the pixel threshold on normal maps, run the batch on "
            "the test images, write masks and overlays, and count the planted defects found."
        ),
    )
    p.add_argument("--out", default="torchdefects_demo", metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed of the made-up data")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from torchdefects.demo import main as demo_main

    code, _ = demo_main(out=args.out, seed=args.seed, device=resolve_device(args.device))
    return code


# ----------------------------------------------------------------------------
# Parser and entry point
# ----------------------------------------------------------------------------

#: One function per command: ``f(subparsers)`` adds its parser and sets ``func``.
#: Add a command by writing ``_add_<name>`` and appending it here.
_COMMANDS: List[Callable[[Any], None]] = [_add_calibrate, _add_run, _add_export, _add_demo]


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
