"""The device part of a run: detector, head, and the records of a batch.

One head call per shape group; a group that runs out of device memory is run again one
input at a time, and an input that alone runs out gets a transient ``out_of_memory``
error record. Records are built by :mod:`~torchdefects.batch.records`.
"""

import os
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor

from torchdefects import files
from torchdefects.attach import _pick_score
from torchdefects.batch.data import Batch, Group
from torchdefects.batch.options import RunOptions, RunUsageError
from torchdefects.batch.records import error_record, result_record, units_columns
from torchdefects.batch.writer import Job
from torchdefects.geometry import ImageSpace

__all__ = ["Compute", "maps_of", "select_map"]


def select_map(out: Any, key: Optional[Union[int, str]]) -> Tensor:
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


def maps_of(out: Any, key: Optional[Union[int, str]], batch: int) -> Tensor:
    maps = select_map(out, key)
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4 or maps.shape[1] != 1 or maps.shape[0] != batch:
        raise ValueError(f"the detector's map must be (B, 1, H, W), got {list(maps.shape)}")
    return maps if maps.is_floating_point() else maps.float()


_REGION_COLUMNS = ("label", "bbox_xyxy", "area", "centroid_xy", "score_max", "score_mean")


def _merged_from_ids(pairs: Tensor, num: int) -> List[List[int]]:
    """``Defects.merged_from`` (``[row, label]`` pairs) as one label list per region row."""
    out: List[List[int]] = [[] for _ in range(num)]
    for row, label in pairs.cpu().tolist():
        out[row].append(label)
    return out


class Compute:
    """Runs groups through the detector and head and turns them into writer jobs.

    Args:
        opts: the run's options.
        plan: a :class:`~torchdefects.batch.plan.Plan` (config, device, detector, names).
    """

    def __init__(self, opts: RunOptions, plan: Any) -> None:
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
        det_score = None
        if plan.detector is not None:
            out = plan.detector(x)
            maps = maps_of(out, plan.map_output, x.shape[0])
            # The detector's own image score (anomalib's pred_score), as attach finds it.
            det_score = _pick_score(out, None, auto=True)
        else:
            maps = x[:, None]
        h, w = int(maps.shape[2]), int(maps.shape[3])
        spaces = [self._space(g.image_sizes[k], h, w) for k in range(len(g.indices))]
        cols = None
        mask = None
        labels = None
        cfg = plan.cfg
        severity_names = None
        image_sev: Optional[List[int]] = None
        units: Optional[List[Any]] = None
        if self.head is not None:
            scale = None
            if cfg.pixel_size_mm is not None:
                # A map pixel spans (sx, sy) image pixels: the head's mm rules see it.
                affine = [(1.0, 1.0) if s is None else s.affine_xy()[0] for s, _ in spaces]
                scale = torch.tensor(affine, dtype=torch.float64, device=maps.device)
            d = self.head(maps, None, det_score, scale)
            counts = d.num_regions.cpu().tolist()
            rmax, rmean = d.roi_max.cpu().tolist(), d.roi_mean.cpu().tolist()
            scores, labels = d.image_score.cpu().tolist(), d.image_label.cpu().tolist()
            r = d.regions
            cols = {k: getattr(r, k).cpu().tolist() for k in _REGION_COLUMNS}
            if d.solidity is not None:
                cols["solidity"] = d.solidity.cpu().tolist()
            if d.merged_from is not None:
                cols["merged_from_ids"] = _merged_from_ids(d.merged_from, len(cols["label"]))
            if d.severity is not None and d.image_severity is not None:
                cols["severity"] = d.severity.cpu().tolist()
                image_sev = d.image_severity.cpu().tolist()
                severity_names = [rule["name"] for rule in cfg.severity_rules or []]
            if cfg.pixel_size_mm is not None:
                more, units = units_columns(r, counts, [s for s, _ in spaces], cfg.pixel_size_mm)
                cols.update(more)
            if plan.mask_dir is not None or plan.overlay_dir is not None:
                mask = d.mask[:, 0].cpu().numpy()
        else:
            from torchdefects.roi import roi_stats

            mx, mn = roi_stats(maps, self.roi)
            rmax, rmean = mx.cpu().tolist(), mn.cpu().tolist()
            counts = [0] * len(g.indices)
            scores = rmax if det_score is None else det_score.float().cpu().tolist()
        source = "roi_max" if det_score is None else "detector"
        maps_np = None
        if opts.save_maps or (plan.overlay_dir is not None and plan.detector is not None):
            maps_np = maps[:, 0].float().cpu().numpy()  # kept, or the heat under an image
        jobs = []
        start = 0
        for k, index in enumerate(g.indices):
            space, img_size = spaces[k]
            rec = result_record(
                index=index, path=plan.paths[index], map_shape=(h, w), image_size=img_size,
                space=space, threshold=plan.threshold or 0.0, provenance=plan.provenance or {},
                roi_max=rmax[k], roi_mean=rmean[k], cols=cols, start=start, count=int(counts[k]),
                score=scores[k], score_source=source,
                label=None if labels is None else int(labels[k]),
                image_threshold=plan.cfg.image_threshold,
                severity_names=severity_names,
                image_severity=None if image_sev is None else image_sev[k],
                units=None if units is None else units[k],
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
            if opts.save_maps and maps_np is not None:
                job.map_path = os.path.join(opts.out, "maps", name + ".npy")
                job.anomaly_map = maps_np[k]
            if plan.overlay_dir is not None and cols is not None:
                job.overlay_path = os.path.join(plan.overlay_dir, name + ".png")
                job.source = g.sources[k]
                job.source_is_image = plan.detector is not None
                if maps_np is not None:
                    job.anomaly_map = maps_np[k]
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
