"""The ``torchdefects`` command line: a thin shell over the library.

Usage: ``torchdefects <command> [options]`` or ``python -m torchdefects <command>``.
Commands register themselves through one small function each (see ``_COMMANDS`` at the
bottom); an option the user did not set is absent from the parsed namespace
(``argparse.SUPPRESS``), so only options the user set are forwarded and the library's
defaults stay the single source of truth.

Exit codes:
    0  success.
    1  other failure: an unexpected error, no input could be used, or a write failed for
       a reason outside the inputs (disk full: ``run --resume`` continues).
    2  usage error: bad arguments, a bad config file, no inputs matched.
    3  some inputs failed; the others were processed and the output written
       (the summary lists the failed inputs).
    130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM; ``run`` leaves a state that
         ``--resume`` continues.

The codes live in :mod:`torchdefects.batch.options`; ``run``'s flags are generated from the
fields of :class:`~torchdefects.batch.RunOptions` and :class:`~torchdefects.DefectsConfig`
(:mod:`torchdefects._fields`).
"""

import argparse
import os
import signal
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional

from torchdefects.batch.options import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_TERMINATED,
    EXIT_USAGE,
    RunInterrupted,
    RunStopped,
    RunUsageError,
    _int_or_key,
)
from torchdefects.evaluate import (
    add_evaluate_command,
    add_supervised_calibrate_arguments,
    run_supervised_calibrate,
)

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "build_parser", "main"]

#: The one usage error: exit code 2, message without traceback.
UsageError = RunUsageError


class CommandFailed(Exception):
    """The command could not do its job: exit code 1, message without traceback."""


# ----------------------------------------------------------------------------
# Helpers shared by commands
# ----------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    """``--device`` to a device name (see ``_check.check_device``); bad values are usage errors."""
    from torchdefects._check import check_device

    try:
        return str(check_device(name))
    except ValueError as e:
        raise UsageError(str(e)) from e


def _command(sub: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose unset options stay absent from the namespace (SUPPRESS)."""
    return sub.add_parser(
        name, help=summary, description=description, argument_default=argparse.SUPPRESS
    )


def _print(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------
# calibrate
# ----------------------------------------------------------------------------


def _add_calibrate(sub: Any) -> None:
    p = _command(
        sub,
        "calibrate",
        "pixel threshold from normal anomaly maps (exact quantile), written to a config",
        (
            "Compute the pixel threshold as the q-quantile of every ROI pixel of normal "
            "anomaly maps, exactly as numpy.quantile would, streaming the maps in batches; "
            "write it with its provenance into a config file (created or updated)."
        ),
    )
    from torchdefects.batch.plan import add_detector_arguments

    g = p.add_argument_group("inputs (--maps, or --images with --detector)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--maps", help="folder (recursive) or glob of normal maps")
    src.add_argument("--images", metavar="DIR_OR_GLOB", help="normal images, scored by --detector")
    add_detector_arguments(g)
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
    add_supervised_calibrate_arguments(p)
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import os

    from torchdefects.batch.calibrate import CalibrationFailed, calibrate_maps
    from torchdefects.batch.progress import Progress
    from torchdefects.config import (
        ConfigError,
        read_config_dict,
        save_config,
        set_pixel_threshold,
        validate_config_dict,
    )

    quiet = args.quiet
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    paths, load = _calibration_inputs(args, device)

    base_path = getattr(args, "config", None)
    if base_path is None and os.path.exists(args.output):
        base_path = args.output
    category = getattr(args, "category", None)
    try:
        raw = read_config_dict(base_path) if base_path is not None else {}
        configs = validate_config_dict(raw, base_path)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    # A new category starts from the global block, as load_config will merge it.
    base = configs.get(category, configs[""]) if category else configs[""]
    roi = getattr(args, "roi_xyxy_norm", None)
    if roi is None:
        roi = base.roi_xyxy_norm
    if getattr(args, "strategy", "normal_quantile") == "segf1":
        return _calibrate_supervised(args, raw, device, category)
    if hasattr(args, "gt_masks") or hasattr(args, "image_strategy"):
        raise UsageError("--gt-masks and --image-strategy go with --strategy segf1")

    bars: dict = {}

    def progress(label: str, done: int, total: int) -> None:
        if label not in bars:
            for bar in bars.values():
                bar.close()
            if bars:
                _print("calibrate: second pass over the maps (exact order statistics)", quiet)
            bars[label] = Progress(label, total, quiet=quiet)
        bars[label].update(done)

    try:
        res = calibrate_maps(
            paths,
            q=getattr(args, "q", None),
            roi_xyxy_norm=roi,
            nan_policy=getattr(args, "nan_policy", "raise"),
            device=device,
            batch_size=args.batch_size,
            load=load,
            progress=progress,
        )
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e
    except CalibrationFailed as e:
        raise CommandFailed(str(e)) from e
    finally:
        for bar in bars.values():
            bar.close()
    threshold, provenance = res.threshold, res.provenance

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
        f"{provenance['calibration_map_count']} maps, "
        f"{provenance['calibration_pixel_count']} ROI pixels)"
        f" -> {args.output} [{where}]",
        quiet,
    )
    quantiles = dict(provenance.get("normal_quantiles") or {})
    quantiles["max"] = provenance.get("normal_max")
    _print(
        "calibrate: normal pixels: "
        + ", ".join(f"q{k}={v!r}" if k != "max" else f"max={v!r}" for k, v in quantiles.items())
        + " (the threshold sits at q="
        + str(provenance["q"])
        + ")",
        quiet,
    )
    if res.failed:
        print(
            f"calibrate: {len(res.failed)} of {len(paths)} maps failed and were left out:",
            file=sys.stderr,
        )
        for f in res.failed:
            print(f"  {f}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def _calibration_inputs(args: argparse.Namespace, device: str) -> Any:
    """(paths, load): normal maps as read, or normal images through ``--detector``."""
    import torch

    from torchdefects.batch.options import RunUsageError
    from torchdefects.batch.plan import images_through_detector
    from torchdefects.files import IMAGE_EXTENSIONS, MAP_EXTENSIONS, list_inputs

    images = getattr(args, "images", None)
    spec, exts, flag = (
        (args.maps, MAP_EXTENSIONS, "--maps")
        if images is None
        else (images, IMAGE_EXTENSIONS, "--images")
    )
    try:
        paths = list_inputs(spec, exts)
        load = images_through_detector(
            args, None if images is None else paths, torch.device(device)
        )
    except FileNotFoundError as e:
        raise UsageError(f"{flag}: {e}") from e
    except RunUsageError as e:
        raise UsageError(str(e)) from e
    return paths, load


def _calibrate_supervised(
    args: argparse.Namespace, raw: Dict[str, Any], device: str, category: Optional[str]
) -> int:
    """``calibrate --strategy segf1``: thresholds from labelled defects (docs/evaluation.md)."""
    from torchdefects.config import ConfigError, save_config

    if getattr(args, "images", None) is not None:
        raise UsageError("--strategy segf1 takes --maps (maps of labelled parts), not --images")
    args.device = device
    try:
        raw = run_supervised_calibrate(args, raw)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    try:
        save_config(raw, args.output)
    except ConfigError as e:
        raise CommandFailed(str(e)) from e
    block = raw["defects"] if category is None else raw["per_category"][category]["defects"]
    prov = block["pixel_threshold_provenance"]
    line = (
        f"calibrate: pixel_threshold = {block['pixel_threshold']!r} (segf1, pixel F1 "
        f"{prov.get('f1')}) -> {args.output}"
    )
    if block.get("image_threshold") is not None:
        line += f"; image_threshold = {block['image_threshold']!r}"
    _print(line, args.quiet)
    return EXIT_OK


# ----------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------


def _add_run(sub: Any) -> None:
    from torchdefects._fields import add_flags
    from torchdefects.batch.options import RunOptions
    from torchdefects.config import DefectsConfig

    p = _command(
        sub,
        "run",
        "defects for a folder of anomaly maps or images: results.jsonl, masks, overlays",
        (
            "Run the defect head over every input, batched on the device; write one JSON "
            "record per input to OUT/results.jsonl in input order (see docs/schema.md), and "
            "optionally masks, overlays and regions.jsonl. Flags override the config file only "
            "when given. OUT is locked while the run goes on; --resume continues a run "
            "stopped by a kill, a signal or a full disk, with the same settings."
        ),
    )
    titles = ("inputs", "settings (flags win over the config)", "pyimgano-compatible", "output")
    groups = {t: p.add_argument_group(t) for t in (*titles, "execution")}
    run_fields = add_flags(p, RunOptions, groups)
    settings = groups.get("settings (flags win over the config)")
    # A DefectsConfig field that is also a RunOptions field (pixel_threshold, mask_format)
    # has its flag there.
    config_fields = add_flags(p, DefectsConfig, groups, default_group=settings, skip=run_fields)
    p.set_defaults(func=_cmd_run, _run_fields=run_fields, _config_fields=config_fields)


def _cmd_run(args: argparse.Namespace) -> int:
    from torchdefects._fields import user_values
    from torchdefects.batch import RunOptions, run_folder

    direct = user_values(args, args._run_fields)
    overrides = user_values(args, args._config_fields)
    summary = run_folder(RunOptions(overrides=overrides, **direct))
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.line(), file=sys.stderr)
    return summary.exit_code


# ----------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------


def _add_export(sub: Any) -> None:
    p = _command(
        sub,
        "export",
        "write the head (or detector + head) with its config: TorchScript, .pt2 or ONNX",
        (
            "Export DefectHead for the config (and category), optionally behind a detector, "
            "with the config and threshold provenance embedded: TorchScript (torch.jit.load), "
            "torch.export .pt2 (torch.export.load) or ONNX (onnxruntime, TensorRT, OpenVINO); "
            "none needs torchdefects to load. See docs/deployment.md."
        ),
    )
    p.add_argument("--config", required=True, metavar="FILE", help="config file (JSON)")
    p.add_argument("--category", metavar="NAME", help="category of the config to use")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("torchscript", "pt2", "onnx"),
        help="default: from OUT's extension (.onnx ONNX, .pt2 torch.export, else TorchScript)",
    )
    p.add_argument(
        "--detector",
        metavar="MODEL",
        help="detector put in front: TorchScript (.pt, torchscript format), a torch.export "
        "program (.pt2) or an ONNX file (.onnx, joined onto: onnx format)",
    )
    p.add_argument(
        "--map-output",
        type=_int_or_key,
        metavar="INDEX_OR_KEY",
        help="the map among the detector's outputs (tuple index, dict key or output name)",
    )
    p.add_argument(
        "--threshold-input",
        action="store_true",
        help="pt2/onnx: take pixel_threshold (B,) as an input",
    )
    p.add_argument(
        "--example-shape",
        type=int,
        nargs=4,
        metavar=("B", "C", "H", "W"),
        help="the detector's input shape to trace with (a .pt2 detector has its own)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="file to write")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from torchdefects.config import ConfigError
    from torchdefects.export import export_from_config

    try:
        line = export_from_config(
            args.config,
            args.output,
            getattr(args, "fmt", None),
            category=getattr(args, "category", None),
            detector=getattr(args, "detector", None),
            map_output=getattr(args, "map_output", None),
            threshold_input=getattr(args, "threshold_input", False),
            example_shape=getattr(args, "example_shape", None),
        )
    except (ConfigError, OSError, ValueError) as e:
        raise UsageError(str(e)) from e
    print(f"torchdefects export: {line}", file=sys.stderr)
    return EXIT_OK


# ----------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------


def _add_demo(sub: Any) -> None:
    p = _command(
        sub,
        "demo",
        "the whole job on made-up textured parts with planted defects (no download)",
        (
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
_COMMANDS: List[Callable[[Any], Any]] = [
    _add_calibrate,
    _add_run,
    _add_export,
    add_evaluate_command,
    _add_demo,
]


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


def _on_signal(signum: int, _: Any) -> None:
    raise RunInterrupted(signum)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    # From here on SIGINT and SIGTERM end with one line, never a traceback.
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    prog = "torchdefects"
    try:
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
        return int(func(args))
    except RunInterrupted as e:
        name = signal.Signals(e.signum).name
        hint = ""
        if prog == "torchdefects run":
            hint = "; the results so far are kept: rerun the same command with --resume"
        print(f"{prog}: interrupted by {name}{hint}", file=sys.stderr)
        code = EXIT_TERMINATED if e.signum == signal.SIGTERM else EXIT_INTERRUPTED
        if argv is None:
            # A process told to stop: the journal is consistent and the lock released, so
            # skip the interpreter's teardown (torch's takes seconds on a busy machine).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandFailed, RunStopped) as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:
        print(f"{prog}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
