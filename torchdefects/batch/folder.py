"""``run_folder``: the defect head over every input of a folder (``torchdefects run``).

The order of a run, so that a usage error never leaves a file behind:

1. **check** the options, list the inputs (the output folders excluded), load the config,
   resolve the threshold (or calibrate it on ``--train-dir``), load the detector;
2. **journal** (rank 0): create ``--out``, take its lock, start fresh or resume (the
   manifest must match), write the manifest (:mod:`~torchdefects.batch.journal`);
3. **stream**: a DataLoader reads the inputs still to do (:mod:`~torchdefects.batch.data`),
   one head call per shape runs on the device, the writer thread writes the files and the
   records (:mod:`~torchdefects.batch.writer`); nothing is kept per input but one byte of
   state and the path list;
4. **finish**: rank files merged in input order, totals over every rank.

SIGINT and SIGTERM stop the loaders at once and leave a resumable journal
(:class:`~torchdefects.batch.options.RunInterrupted`); an out-of-memory sub-batch is run
again one input at a time.
"""

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from torchdefects import files
from torchdefects._check import check_device
from torchdefects.batch import dist, journal
from torchdefects.batch.calibrate import CalibrationFailed, calibrate_maps
from torchdefects.batch.data import (
    Batch,
    Group,
    InputDataset,
    collate,
    list_run_inputs,
    output_names,
    worker_init,
)
from torchdefects.batch.options import (
    EXIT_OK,
    EXIT_PARTIAL,
    RunInterrupted,
    RunOptions,
    RunSummary,
    RunUsageError,
)
from torchdefects.batch.progress import Progress
from torchdefects.batch.records import error_record, result_record
from torchdefects.batch.writer import Job, Writer
from torchdefects.config import DefectsConfig
from torchdefects.geometry import ImageSpace, Preprocess

__all__ = ["PREPROCESS_EXTRA_FILE", "run_folder"]

#: Extra file of a TorchScript detector with its preprocessing (``input_size``, ``mean``,
#: ``std``, ``center_crop``); flags override it.
PREPROCESS_EXTRA_FILE = "torchdefects/preprocess.json"


# ----------------------------------------------------------------------------
# Settings (step 1)
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """Everything resolved before the first file is written."""

    kind: str
    paths: List[str]
    names: List[str]
    cfg: DefectsConfig
    defects: bool
    threshold: Optional[float]
    provenance: Optional[Dict[str, Any]]
    mask_format: Optional[str]
    mask_dir: Optional[str]
    overlay_dir: Optional[str]
    device: torch.device
    detector: Any
    prep: Optional[Preprocess]


def _check_options(opts: RunOptions) -> None:
    if opts.batch_size < 1:
        raise RunUsageError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.num_workers < 0:
        raise RunUsageError(f"--num-workers must be >= 0, got {opts.num_workers}")
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
    if opts.defects_mask_space == "full":
        raise RunUsageError(
            "--defects-mask-space full is not supported yet: torchdefects gates pixels by "
            "the ROI before morphology (mask_space roi)"
        )
    if opts.mask_format is not None and opts.save_masks is None:
        raise RunUsageError("--mask-format needs --save-masks")
    if (opts.maps is None) == (opts.images is None):
        raise RunUsageError("give exactly one of --maps or --images")
    if opts.images is not None and opts.detector is None:
        raise RunUsageError("--images needs --detector MODEL.pt")
    if opts.maps is not None and opts.detector is not None:
        raise RunUsageError("--detector goes with --images, not --maps")


def _output_dirs(
    opts: RunOptions, cfg: DefectsConfig
) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(mask format, mask folder, overlay folder)."""
    fmt = opts.mask_format or cfg.mask_format or "png"
    mask_dir = None
    if opts.save_masks is not None:
        if opts.save_masks in ("png", "npy", "npz"):
            fmt = opts.save_masks
            mask_dir = os.path.join(opts.out, "masks")
        elif opts.save_masks == "config":
            mask_dir = os.path.join(opts.out, "masks")
        elif opts.save_masks == "":
            raise RunUsageError("--save-masks: give a format (png, npy, npz) or a folder")
        else:
            mask_dir = opts.save_masks
    overlay_dir = None
    if opts.save_overlays is True or opts.save_overlays == "":
        overlay_dir = os.path.join(opts.out, "overlays")
    elif isinstance(opts.save_overlays, str):
        overlay_dir = opts.save_overlays
    return (fmt if mask_dir is not None else None), mask_dir, overlay_dir


def _load_config(opts: RunOptions) -> DefectsConfig:
    from torchdefects.config import ConfigError, load_config

    if opts.config is None:
        if opts.category is not None:
            raise RunUsageError("--category needs --config")
        cfg = DefectsConfig()
    else:
        try:
            cfg = load_config(opts.config, opts.category)
        except (ConfigError, ValueError, TypeError, OSError) as e:
            raise RunUsageError(f"--config {opts.config}: {e}") from e
    try:
        return dataclasses.replace(cfg, **opts.overrides)
    except (TypeError, ValueError) as e:
        raise RunUsageError(str(e)) from e


def _threshold(
    opts: RunOptions, cfg: DefectsConfig, plan_device: torch.device, detector: Any, prep: Any
) -> Tuple[float, Dict[str, Any]]:
    """The pixel threshold and its provenance, by ``--pixel-threshold-strategy``."""
    from torchdefects.calibration import resolve_pixel_threshold

    strategy = opts.pixel_threshold_strategy or getattr(cfg, "pixel_threshold_strategy", None)
    if opts.train_dir is not None and strategy in (None, "normal_pixel_quantile"):
        strategy = "normal_pixel_quantile"
    if strategy == "normal_pixel_quantile":
        if opts.train_dir is None:
            raise RunUsageError(
                "--pixel-threshold-strategy normal_pixel_quantile needs --train-dir"
            )
        if opts.pixel_threshold is not None:
            raise RunUsageError("--pixel-threshold and normal_pixel_quantile exclude each other")
        return _calibrate_inline(opts, cfg, plan_device, detector, prep)
    if opts.train_dir is not None:
        raise RunUsageError(f"--train-dir goes with normal_pixel_quantile, not {strategy}")
    if strategy == "fixed" and opts.pixel_threshold is None:
        raise RunUsageError("--pixel-threshold-strategy fixed needs --pixel-threshold T")
    explicit = opts.pixel_threshold
    if strategy == "infer_config":
        if explicit is not None:
            raise RunUsageError("--pixel-threshold and infer_config exclude each other")
        if cfg.pixel_threshold is None:
            raise RunUsageError("--pixel-threshold-strategy infer_config: the config has none")
    try:
        t, prov = resolve_pixel_threshold(explicit, cfg, opts.config)
    except ValueError as e:
        raise RunUsageError(str(e)) from e
    return float(t), prov


def _calibrate_inline(
    opts: RunOptions, cfg: DefectsConfig, device: torch.device, detector: Any, prep: Any
) -> Tuple[float, Dict[str, Any]]:
    assert opts.train_dir is not None
    kind = "images" if detector is not None else "maps"
    paths, _ = list_run_inputs(opts.train_dir, kind, [opts.out], flag="--train-dir")
    q = opts.pixel_normal_quantile
    if q is None:
        q = getattr(cfg, "pixel_normal_quantile", None)
    load = None
    if detector is not None:
        ds = InputDataset(paths, range(len(paths)), "images", prep, False)
        position = {p: i for i, p in enumerate(paths)}

        def load(path: Any) -> np.ndarray:
            item = ds[position[path]]
            if item.error is not None:
                raise ValueError(item.error[1])
            with torch.inference_mode():
                m = _maps_of(detector(item.tensor[None].to(device)), opts.map_output, 1)
            return m[0, 0].float().cpu().numpy()

    try:
        res = calibrate_maps(
            paths, q=q, roi_xyxy_norm=cfg.roi_xyxy_norm, device=device, load=load,
            batch_size=opts.batch_size,
        )  # fmt: skip
    except (ValueError, CalibrationFailed) as e:
        raise RunUsageError(f"--train-dir {opts.train_dir}: {e}") from e
    if res.failed:
        raise RunUsageError(
            f"--train-dir {opts.train_dir}: {len(res.failed)} normal inputs unusable: "
            + "; ".join(res.failed[:5])
        )
    prov = dict(res.provenance, source="train_dir", train_dir=opts.train_dir)
    return res.threshold, prov


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


def _preprocess_from(opts: RunOptions, meta: Dict[str, Any]) -> Preprocess:
    size = opts.input_size if opts.input_size is not None else meta.get("input_size")
    mean = opts.mean if opts.mean is not None else meta.get("mean")
    std = opts.std if opts.std is not None else meta.get("std")
    crop = opts.center_crop if opts.center_crop is not None else bool(meta.get("center_crop"))
    if crop and size is None:
        raise RunUsageError("--center-crop needs --input-size H W (or the detector's metadata)")
    return Preprocess(
        tuple(int(v) for v in size) if size is not None else None,  # type: ignore[arg-type]
        tuple(float(v) for v in mean) if mean is not None else None,
        tuple(float(v) for v in std) if std is not None else None,
        crop,
    )


def _plan(opts: RunOptions, r: dist.Ranks) -> _Plan:
    _check_options(opts)
    cfg = _load_config(opts)
    mask_format, mask_dir, overlay_dir = _output_dirs(opts, cfg)
    kind = "maps" if opts.maps is not None else "images"
    spec = opts.maps if opts.maps is not None else opts.images
    assert spec is not None
    exclude = [d for d in (opts.out, mask_dir, overlay_dir) if d is not None]
    paths, root = list_run_inputs(spec, kind, exclude, flag="--" + kind)
    try:
        device = check_device(opts.device, r.local_rank)
    except ValueError as e:
        raise RunUsageError(str(e)) from e
    detector = prep = None
    if kind == "images":
        assert opts.detector is not None
        detector, meta = _load_detector(opts.detector, device)
        prep = _preprocess_from(opts, meta)
    enabled = opts.defects if opts.defects is not None else getattr(cfg, "enabled", True)
    threshold = provenance = None
    if enabled:
        threshold, provenance = _threshold(opts, cfg, device, detector, prep)
        cfg = dataclasses.replace(cfg, pixel_threshold=threshold)
    names = output_names(paths, root)
    return _Plan(kind, paths, names, cfg, bool(enabled), threshold, provenance,
                 mask_format, mask_dir, overlay_dir, device, detector, prep)  # fmt: skip


def _settings(opts: RunOptions, plan: _Plan) -> Dict[str, Any]:
    """What the results depend on: compared by ``--resume`` (journal.check_manifest)."""
    prov = dict(plan.provenance or {})
    prov.pop("created_at", None)
    cfg = plan.cfg.to_dict()
    cfg.pop("pixel_threshold_provenance", None)
    return {
        "config": cfg,
        "defects_enabled": plan.defects,
        "pixel_threshold": plan.threshold,
        "pixel_threshold_provenance": prov,
        "inputs": {
            "kind": plan.kind,
            "count": len(plan.paths),
            "fingerprint": journal.fingerprint(plan.paths),
        },
        "outputs": {
            "mask_format": plan.mask_format,
            "mask_dir": plan.mask_dir,
            "mask_space": opts.mask_space,
            "overlay_dir": plan.overlay_dir,
            "regions_jsonl": opts.regions_jsonl,
            "image_size": list(opts.image_size) if opts.image_size else None,
        },
        "detector": None
        if plan.detector is None
        else {
            "path": opts.detector,
            "map_output": opts.map_output,
            "preprocess": dataclasses.asdict(plan.prep) if plan.prep else None,
        },
    }


def _versions() -> Dict[str, str]:
    from torchdefects import __version__

    return {"torchdefects": __version__, "torch": torch.__version__, "numpy": np.__version__}


# ----------------------------------------------------------------------------
# Journal (step 2)
# ----------------------------------------------------------------------------


def _open_journal(opts: RunOptions, plan: _Plan, r: dist.Ranks) -> Optional[journal.RunLock]:
    """Rank 0 locks and prepares ``out``; every rank learns whether that worked."""
    lock = None
    message = None
    if r.rank == 0:
        try:
            os.makedirs(opts.out, exist_ok=True)
            lock = journal.RunLock(opts.out)
            settings = _settings(opts, plan)
            if (opts.resume and os.path.exists(os.path.join(opts.out, "results.jsonl"))) or (
                opts.resume and journal.rank_files(opts.out, "results")
            ):
                journal.check_manifest(opts.out, settings)
                temp = [os.path.join(opts.out, "masks"), os.path.join(opts.out, "overlays")]
                temp += [d for d in (plan.mask_dir, plan.overlay_dir) if d]
                journal.prepare_resume(opts.out, len(plan.paths), temp)
            elif not opts.resume:
                journal.prepare_fresh(opts.out, opts.overwrite)
            journal.write_manifest(opts.out, settings, _versions())
        except (RunUsageError, OSError) as e:
            message = str(e) if isinstance(e, RunUsageError) else f"--out {opts.out}: {e}"
            if lock is not None:
                lock.release()
                lock = None
    message = dist.broadcast(r, message)
    if message is not None:
        raise RunUsageError(message)
    return lock


# ----------------------------------------------------------------------------
# Compute (step 3)
# ----------------------------------------------------------------------------


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


def _maps_of(out: Any, key: Optional[Union[int, str]], batch: int) -> Tensor:
    maps = _select_map(out, key)
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4 or maps.shape[1] != 1 or maps.shape[0] != batch:
        raise ValueError(f"the detector's map must be (B, 1, H, W), got {list(maps.shape)}")
    return maps if maps.is_floating_point() else maps.float()


_REGION_COLUMNS = ("label", "bbox_xyxy", "area", "centroid_xy", "score_max", "score_mean")


class _Compute:
    """Runs groups through the detector and head and turns them into writer jobs."""

    def __init__(self, opts: RunOptions, plan: _Plan) -> None:
        from torchdefects.head import DefectHead

        self.opts = opts
        self.plan = plan
        self.head = DefectHead(plan.cfg).to(plan.device).eval() if plan.defects else None
        roi = plan.cfg.roi_xyxy_norm
        self.roi = (
            None if roi is None else torch.tensor(roi, dtype=torch.float32, device=plan.device)
        )

    def batch(self, batch: Batch) -> List[Job]:
        paths = self.plan.paths
        jobs = [Job(i, error_record(i, paths[i], t, m)) for i, t, m in batch.errors]
        for g in batch.groups:
            jobs.extend(self._group(g))
        jobs.sort(key=lambda j: j.index)
        return jobs

    def _group(self, g: Group) -> List[Job]:
        try:
            return self._run(g)
        except RunUsageError:
            raise
        except torch.OutOfMemoryError:
            if len(g.indices) == 1:
                return [self._error(g.indices[0], "out_of_memory", "out of memory")]
        except Exception as e:
            return [self._error(i, self._etype(), f"{type(e).__name__}: {e}") for i in g.indices]
        # Out of memory on a sub-batch: each input alone before any is marked failed.
        self._free()
        jobs = []
        for k in range(len(g.indices)):
            one = Group([g.indices[k]], g.batch[k : k + 1], [g.image_sizes[k]], [g.sources[k]])
            jobs.extend(self._group(one))
            self._free()
        return jobs

    def _free(self) -> None:
        if self.plan.device.type == "cuda":
            torch.cuda.empty_cache()

    def _etype(self) -> str:
        return "detector_error" if self.plan.detector is not None else "head_error"

    def _error(self, index: int, etype: str, message: str) -> Job:
        return Job(index, error_record(index, self.plan.paths[index], etype, message))

    def _run(self, g: Group) -> List[Job]:
        plan, opts = self.plan, self.opts
        x = g.batch.to(plan.device, non_blocking=True)
        maps = (
            _maps_of(plan.detector(x), opts.map_output, x.shape[0]) if plan.detector else x[:, None]
        )
        h, w = int(maps.shape[2]), int(maps.shape[3])
        cols = None
        mask = None
        if self.head is not None:
            d = self.head(maps)
            counts = d.num_regions.cpu().tolist()
            rmax, rmean = d.roi_max.cpu().tolist(), d.roi_mean.cpu().tolist()
            r = d.regions
            cols = {k: getattr(r, k).cpu().tolist() for k in _REGION_COLUMNS}
            if plan.mask_dir is not None or plan.overlay_dir is not None:
                mask = d.mask[:, 0].cpu().numpy()
        else:
            from torchdefects.roi import roi_stats

            mx, mn = roi_stats(maps, self.roi)
            rmax, rmean = mx.cpu().tolist(), mn.cpu().tolist()
            counts = [0] * len(g.indices)
        jobs = []
        start = 0
        for k, index in enumerate(g.indices):
            space, img_size = self._space(g.image_sizes[k], h, w)
            rec = result_record(
                index=index, path=plan.paths[index], map_shape=(h, w), image_size=img_size,
                space=space, threshold=plan.threshold or 0.0, provenance=plan.provenance or {},
                roi_max=rmax[k], roi_mean=rmean[k], cols=cols, start=start, count=int(counts[k]),
                image_threshold=plan.cfg.image_threshold,
            )  # fmt: skip
            start += int(counts[k])
            job = Job(index, rec, space=space)
            name = plan.names[index]
            if mask is not None:
                job.mask = mask[k]
            if plan.mask_dir is not None and plan.mask_format is not None:
                job.mask_path = os.path.join(
                    plan.mask_dir, name + files.MASK_EXTENSIONS[plan.mask_format]
                )
            if plan.overlay_dir is not None and cols is not None:
                job.overlay_path = os.path.join(plan.overlay_dir, name + ".png")
                job.source = g.sources[k]
                job.source_is_image = plan.detector is not None
            jobs.append(job)
        return jobs

    def _space(self, img_size: Any, h: int, w: int) -> Tuple[Optional[ImageSpace], Any]:
        opts, prep = self.opts, self.plan.prep
        if img_size is None and opts.image_size is not None:
            img_size = (int(opts.image_size[0]), int(opts.image_size[1]))
        if img_size is None:
            return None, None
        crop = bool(opts.center_crop) if prep is None else prep.center_crop
        in_size = opts.input_size if prep is None else prep.input_size
        return ImageSpace.make((h, w), img_size, crop, in_size), img_size


# ----------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`RunInterrupted` in the main thread (once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum: int, _: Any) -> None:
        if fired:
            return
        fired.append(signum)
        raise RunInterrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stop_workers(it: Any) -> None:
    """Terminate loader workers now (their default shutdown waits up to seconds each)."""
    for w in getattr(it, "_workers", []):
        with contextlib.suppress(Exception):
            w.terminate()
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        with contextlib.suppress(Exception):
            shutdown()


# ----------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------


def run_folder(opts: RunOptions) -> RunSummary:
    """Run the defect head over every input of ``opts`` (module docstring).

    Args:
        opts: :class:`~torchdefects.batch.RunOptions`.

    Returns:
        :class:`~torchdefects.batch.RunSummary` over every rank (rank 0 has the merged
        totals); ``exit_code`` is 0 or 3.

    Raises:
        RunUsageError: bad options, config, inputs, or a folder in use; nothing written.
        RunStopped: a write failed for a reason outside the inputs (disk full ...).
        RunInterrupted: SIGINT or SIGTERM; the journal is consistent, ``resume=True``
            continues.

    Example:
        >>> opts = RunOptions(out="out", maps="maps/", pixel_threshold=0.5)
        >>> summary = run_folder(opts)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    r = dist.ranks()
    with stop_on_signals():
        plan = _plan(opts, r)
        dist.start(r)
        try:
            lock = _open_journal(opts, plan, r)
            try:
                processed, skipped, in_order = _stream(opts, plan, r)
                dist.barrier(r)
                if r.rank == 0:
                    _finish_files(opts, plan, r, in_order)
                dist.barrier(r)
                totals = _totals(opts, plan, r, processed, skipped)
            finally:
                if lock is not None:
                    lock.release()
        finally:
            dist.finish(r)
    errors, regions, missing, processed, skipped = totals
    return RunSummary(
        total=len(plan.paths),
        processed=processed,
        skipped=skipped,
        errors=errors,
        regions=regions,
        seconds=time.perf_counter() - t0,
        results_path=os.path.join(opts.out, "results.jsonl"),
        exit_code=EXIT_OK if errors == 0 and missing == 0 else EXIT_PARTIAL,
    )


def _results_name(r: dist.Ranks, stem: str) -> str:
    return f"{stem}.rank{r.rank}.jsonl" if r.distributed else f"{stem}.jsonl"


def _stream(opts: RunOptions, plan: _Plan, r: dist.Ranks) -> Tuple[int, int, bool]:
    """Process this rank's inputs still to do; (processed, skipped, results in order)."""
    n = len(plan.paths)
    sources = [os.path.join(opts.out, "results.jsonl")] + journal.rank_files(opts.out, "results")
    state = journal.scan(sources, n) if opts.resume else np.zeros(n, dtype=np.uint8)
    shard = np.arange(r.rank, n, r.world, dtype=np.int64)
    todo = shard[state[shard] == journal.MISSING]
    done_before = np.flatnonzero(state == journal.OK)
    last = int(done_before.max()) if opts.resume and done_before.size else -1
    del state
    results = os.path.join(opts.out, _results_name(r, "results"))
    regions = os.path.join(opts.out, _results_name(r, "regions")) if opts.regions_jsonl else None
    keep_source = plan.overlay_dir is not None
    dataset = InputDataset(plan.paths, todo, plan.kind, plan.prep, keep_source)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=opts.batch_size,
        shuffle=False,
        num_workers=opts.num_workers,
        collate_fn=collate,
        pin_memory=plan.device.type == "cuda",
        worker_init_fn=worker_init if opts.num_workers > 0 else None,
    )
    compute = _Compute(opts, plan)
    writer = Writer(opts.out, results, regions, plan.mask_format, opts.mask_space, last)
    label = "torchdefects run" + (f" [rank {r.rank}]" if r.distributed else "")
    progress = Progress(label, len(todo), quiet=opts.quiet, tty=opts.progress)
    done = 0
    it = None
    try:
        with torch.inference_mode():
            it = iter(loader)
            for batch in it:
                jobs = compute.batch(batch)
                writer.put(jobs)
                done += len(jobs)
                progress.update(done, f"{writer.errors} errors")
    except BaseException:
        _stop_workers(it)
        with contextlib.suppress(BaseException):
            writer.close()
        progress.close()
        raise
    writer.close()
    progress.close()
    return len(todo), len(shard) - len(todo), writer.in_order


def _finish_files(opts: RunOptions, plan: _Plan, r: dist.Ranks, in_order: bool) -> None:
    """Rank 0: one results.jsonl (and regions.jsonl) in input order."""
    n = len(plan.paths)
    for stem in ("results", "regions") if opts.regions_jsonl else ("results",):
        final = os.path.join(opts.out, f"{stem}.jsonl")
        ranks = journal.rank_files(opts.out, stem)
        if ranks or not in_order:
            journal.merge_jsonl([final] + ranks, final, n)


def _totals(
    opts: RunOptions, plan: _Plan, r: dist.Ranks, processed: int, skipped: int
) -> Tuple[int, int, int, int, int]:
    """(errors, regions, missing, processed, skipped) over every rank, from results.jsonl."""
    n = len(plan.paths)
    errors = regions = 0
    ok = np.zeros(n, dtype=bool)
    if r.rank == 0:
        path = os.path.join(opts.out, "results.jsonl")
        for _, line in journal.iter_lines(path):
            rec = json.loads(line)
            i = int(rec["index"])
            if not 0 <= i < n or ok[i]:
                continue
            ok[i] = True
            if "error" in rec:
                errors += 1
            elif "defects" in rec:
                regions += len(rec["defects"]["regions"])
    missing = n - int(ok.sum()) if r.rank == 0 else 0
    processed, skipped = dist.all_sum(r, [processed, skipped])
    errors, regions, missing = dist.all_sum(r, [errors, regions, missing])
    return errors, regions, missing, processed, skipped
