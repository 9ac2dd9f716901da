"""The background writer: mask and overlay files first, then the batch's JSON lines.

A record line is only written after every file it points to is in place (atomic writes:
temp file then rename), so a run killed at any moment leaves a consistent journal. A write
error of the moment (disk full, file too large, I/O error) stops the run with
:class:`~torchdefects.batch.options.RunStopped` instead of turning every later input into an
error record; an error that belongs to one input (a name the file system refuses) is that
input's ``write_error`` record.
"""

import dataclasses
import errno
import io
import os
import queue
import threading
from typing import Any, Dict, List, Optional

import numpy as np

from torchdefects import files
from torchdefects.batch.options import RunStopped
from torchdefects.batch.records import dumps, error_record, mask_block, region_line

__all__ = ["TRANSIENT_ERRNOS", "Job", "Writer"]

#: errno values that say "the machine", not "this input": the run stops, --resume goes on.
TRANSIENT_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, errno.EFBIG, errno.EIO, getattr(errno, "EDQUOT", None),
                errno.EROFS) if e is not None
)  # fmt: skip


@dataclasses.dataclass
class Job:
    """One input's record and the files to write before it."""

    index: int
    record: Dict[str, Any]
    mask: Optional[np.ndarray] = None  # map space, bool
    mask_path: Optional[str] = None  # absolute
    space: Any = None  # geometry.ImageSpace
    overlay_path: Optional[str] = None
    source: Optional[np.ndarray] = None  # image (H, W, 3) or map (H, W)
    source_is_image: bool = False
    anomaly_map: Optional[np.ndarray] = None  # map space: kept (map_path) or under overlays
    map_path: Optional[str] = None  # absolute, .npy


class Writer:
    """Writes jobs on a thread; :meth:`put` blocks when 4 batches are waiting.

    Args:
        out: output folder (record paths are relative to it when inside it).
        results_path, regions_path: JSONL files appended to (regions optional).
        mask_format: ``png``, ``npy`` or ``npz`` (or ``None``).
        mask_space: ``anomaly_map`` or ``image``.
        last_index: the largest index already in ``results_path`` (-1 if none), to tell
            whether the file stays in input order.
        defects_mask_space: the config's ``mask_space`` (``roi`` or ``full``), recorded in
            the mask block.
    """

    def __init__(
        self,
        out: str,
        results_path: str,
        regions_path: Optional[str],
        mask_format: Optional[str],
        mask_space: str,
        last_index: int = -1,
        defects_mask_space: str = "roi",
    ) -> None:
        self.out = out
        self.defects_mask_space = defects_mask_space
        self.mask_format = mask_format
        self.mask_space = mask_space
        self._results = open(results_path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115
        self._regions = (
            open(regions_path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115
            if regions_path
            else None
        )
        self._queue: queue.Queue[Optional[List[Job]]] = queue.Queue(maxsize=4)
        self._error: Optional[BaseException] = None
        self._discard = threading.Event()
        self.last_index = last_index
        self.in_order = True
        self.errors = 0
        self.regions = 0
        self._thread = threading.Thread(target=self._loop, name="torchdefects-writer", daemon=True)
        self._thread.start()

    def put(self, jobs: List[Job]) -> None:
        """Queue one batch; raises the writer's error if it stopped."""
        self._raise()
        self._queue.put(jobs)

    def close(self, discard: bool = False, wait: float = 5.0) -> None:
        """Write what is queued and close the files; raise the writer's error.

        ``discard`` (a fast stop after a signal): finish only the batch being written, for
        at most ``wait`` seconds; the rest runs again on resume. It takes no lock the
        interrupted main thread may still hold (a signal can land between a lock's
        acquisition and its ``with`` block).
        """
        if discard:
            self._discard.set()
            self._thread.join(timeout=wait)
            if self._thread.is_alive():
                return  # a daemon thread, still writing: leave the files to it
        else:
            self._queue.put(None)
            self._thread.join()
        self._results.close()
        if self._regions is not None:
            self._regions.close()
        self._raise()

    def _raise(self) -> None:
        e = self._error
        if e is None:
            return
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            name = errno.errorcode.get(e.errno, str(e.errno))
            raise RunStopped(
                f"cannot write to {self.out}: {e.strerror or e} ({name}); the run stopped "
                "with every record so far intact: fix this and rerun with --resume"
            ) from e
        raise RuntimeError(f"the writer thread failed: {type(e).__name__}: {e}") from e

    def _loop(self) -> None:
        while not self._discard.is_set():
            try:
                jobs = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if jobs is None:
                return
            if self._error is not None:
                continue  # drain so that put() never blocks forever
            try:
                self._write(jobs)
            except BaseException as e:
                self._error = e

    def _rel(self, path: str) -> str:
        rel = os.path.relpath(path, self.out)
        return path if rel.startswith("..") else rel.replace(os.sep, "/")

    def _write(self, jobs: List[Job]) -> None:
        lines = []
        region_lines = []
        for job in jobs:
            rec = job.record
            if "defects" in rec or job.map_path is not None:
                try:
                    self._write_files(job)
                except OSError as e:
                    if e.errno in TRANSIENT_ERRNOS:
                        raise
                    msg = f"{type(e).__name__}: {e}"
                    rec = error_record(rec["index"], rec["input"], "write_error", msg)
            if "error" in rec:
                self.errors += 1
            elif "defects" in rec:
                regions = rec["defects"]["regions"]
                self.regions += len(regions)
                region_lines.extend(dumps(region_line(rec, r)) for r in regions)
            if rec["index"] < self.last_index:
                self.in_order = False
            self.last_index = max(self.last_index, rec["index"])
            lines.append(dumps(rec))
        # Regions first: a results line exists only when everything of that input is out.
        if self._regions is not None and region_lines:
            self._regions.write("".join(s + "\n" for s in region_lines))
            self._regions.flush()
        self._results.write("".join(s + "\n" for s in lines))
        self._results.flush()

    def _write_files(self, job: Job) -> None:
        if job.map_path is not None and job.anomaly_map is not None:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(job.anomaly_map, dtype=np.float32))
            files.atomic_write_bytes(job.map_path, buf.getvalue(), durable=False)
            job.record["anomaly_map"]["path"] = self._rel(job.map_path)
        d = job.record.get("defects")
        if d is None:
            return
        if job.mask_path is not None and job.mask is not None and self.mask_format:
            m = job.mask
            space = "anomaly_map"
            if self.mask_space == "image" and job.space is not None:
                m = job.space.mask_to_image(m)
                space = "image"
            # Not fsync-ed: atomic against a kill, as the JSONL it is recorded in.
            enc = files.write_mask(job.mask_path, m, self.mask_format, durable=False)
            d["mask"] = mask_block(
                self._rel(job.mask_path), m.shape, enc, space, self.defects_mask_space
            )
        if job.overlay_path is not None and job.source is not None:
            self._write_overlay(job, d)

    def _write_overlay(self, job: Job, d: Dict[str, Any]) -> None:
        from torchdefects.overlay import render_record

        if job.source_is_image:
            mask, amap = job.mask, job.anomaly_map
            if job.space is not None:
                mask = None if mask is None else job.space.mask_to_image(mask)
                amap = None if amap is None else job.space.map_to_image(amap)
            pic = render_record(job.record, image=job.source, anomaly_map=amap, mask=mask)
        else:
            pic = render_record(job.record, anomaly_map=job.source, mask=job.mask)
        buf = io.BytesIO()
        pic.save(buf, format="PNG")
        files.atomic_write_bytes(job.overlay_path, buf.getvalue(), durable=False)
