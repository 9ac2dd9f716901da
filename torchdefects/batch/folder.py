"""``run_folder``: the defect head over every input of a folder (``torchdefects run``).

The order of a run, so that a usage error never leaves a file behind:

1. **plan** (:mod:`~torchdefects.batch.plan`): check the options, list the inputs (the
   output folders excluded), load the config, resolve the threshold (or calibrate it on
   ``--train-dir``), load the detector;
2. **journal** (rank 0): create ``--out``, take its lock, start fresh or resume (the
   manifest must match), write the manifest (:mod:`~torchdefects.batch.journal`);
3. **stream**: a DataLoader reads the inputs still to do (:mod:`~torchdefects.batch.data`),
   one head call per shape runs on the device (:mod:`~torchdefects.batch.compute`), the
   writer thread writes the files and the
   records (:mod:`~torchdefects.batch.writer`); nothing is kept per input but one byte of
   state and the path list;
4. **finish**: rank files merged in input order, totals over every rank.

SIGINT and SIGTERM stop the loaders at once and leave a resumable journal
(:class:`~torchdefects.batch.options.RunInterrupted`). The handler never raises inside the
hand-over to the writer thread (a queue and its locks), and the stop takes no lock a
killed worker may hold. An out-of-memory sub-batch is run again one input at a time.
"""

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch

from torchdefects.batch import dist, journal
from torchdefects.batch.compute import Compute
from torchdefects.batch.data import InputDataset, collate, worker_init
from torchdefects.batch.options import (
    EXIT_OK,
    EXIT_PARTIAL,
    RunInterrupted,
    RunOptions,
    RunSummary,
    RunUsageError,
)
from torchdefects.batch.plan import PREPROCESS_EXTRA_FILE, Plan, make_plan, settings, versions
from torchdefects.batch.progress import Progress
from torchdefects.batch.writer import Writer

__all__ = ["PREPROCESS_EXTRA_FILE", "run_folder"]


# ----------------------------------------------------------------------------
# Journal (step 2)
# ----------------------------------------------------------------------------


def _open_journal(opts: RunOptions, plan: Plan, r: dist.Ranks) -> Optional[journal.RunLock]:
    """Rank 0 locks and prepares ``out``; every rank learns whether that worked."""
    lock = None
    message = None
    if r.rank == 0:
        try:
            os.makedirs(opts.out, exist_ok=True)
            lock = journal.RunLock(opts.out)
            wanted = settings(opts, plan)
            if (opts.resume and os.path.exists(os.path.join(opts.out, "results.jsonl"))) or (
                opts.resume and journal.rank_files(opts.out, "results")
            ):
                journal.check_manifest(opts.out, wanted)
                temp = [os.path.join(opts.out, d) for d in ("masks", "overlays", "maps")]
                temp += [d for d in (plan.mask_dir, plan.overlay_dir) if d]
                journal.prepare_resume(opts.out, len(plan.paths), temp)
            elif not opts.resume:
                journal.prepare_fresh(opts.out, opts.overwrite)
            journal.write_manifest(opts.out, wanted, versions())
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
# Signals
# ----------------------------------------------------------------------------


class _Signals:
    """The run's signal state: the first SIGINT or SIGTERM raises :class:`RunInterrupted`
    in the main thread, at once, or when it leaves a :meth:`held` section."""

    def __init__(self) -> None:
        self.fired: Optional[int] = None
        self.pending: Optional[int] = None
        self.depth = 0

    def handler(self, signum: int, _: Any) -> None:
        if self.fired is not None or self.pending is not None:
            return
        if self.depth:
            self.pending = signum
            return
        self.fired = signum
        raise RunInterrupted(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No signal lands inside: an exception raised by a handler inside ``queue.Queue``
        or a ``with lock:`` can leave the lock taken or a wake-up lost (the writer thread
        then waits forever). What arrives meanwhile is raised on the way out."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None and self.fired is None:
            self.fired, self.pending = self.pending, None
            raise RunInterrupted(self.fired)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[_Signals]:
    """SIGINT and SIGTERM raise :class:`RunInterrupted` in the main thread (once)."""
    state = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    old = {s: signal.signal(s, state.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stop_workers(it: Any, wait: float = 2.0) -> None:
    """Stop loader workers now, touching no lock a worker may hold.

    torch's own shutdown sets an ``Event`` shared with the workers and joins each for up to
    5 s; after a worker was killed while holding that ``Event``'s lock, it waits forever.
    So: unregister the workers from torch's SIGCHLD check, terminate them, reap them
    (``SIGKILL`` after ``wait`` seconds), let the queues go without joining their feeder
    threads, and mark the iterator shut down so its ``__del__`` does nothing more.
    """
    workers = list(getattr(it, "_workers", None) or [])
    if not workers:
        return
    if getattr(it, "_worker_pids_set", False):
        with contextlib.suppress(Exception):
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    it._shutdown = True
    done = getattr(it, "_pin_memory_thread_done_event", None)
    if done is not None:
        done.set()  # a threading.Event: the pin-memory thread ends at its next check
    for w in workers:
        with contextlib.suppress(Exception):
            w.terminate()
    deadline = time.monotonic() + wait
    for w in workers:
        with contextlib.suppress(Exception):
            w.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                w.kill()
                w.join(timeout=1.0)
    for q in getattr(it, "_index_queues", []):
        with contextlib.suppress(Exception):
            q.cancel_join_thread()
            q.close()
    # Not closed: a pin-memory thread (CUDA runs) may still be reading it until it sees
    # its done event; garbage collection closes it.
    with contextlib.suppress(Exception):
        it._worker_result_queue.cancel_join_thread()


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
    with stop_on_signals() as signals:
        plan = make_plan(opts, r)
        dist.start(r)
        try:
            lock = _open_journal(opts, plan, r)
            try:
                processed, skipped, in_order = _stream(opts, plan, r, signals)
                dist.barrier(r)
                if r.rank == 0:
                    _finish_files(opts, plan, r, in_order)
                    if opts.report:
                        from torchdefects.report import write_report

                        write_report(opts.out)
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


def _stream(
    opts: RunOptions, plan: Plan, r: dist.Ranks, signals: _Signals
) -> Tuple[int, int, bool]:
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
    dataset = InputDataset(plan.paths, todo, plan.kind, plan.prep, keep_source, opts.max_pixels)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=opts.batch_size,
        shuffle=False,
        num_workers=opts.num_workers,
        collate_fn=collate,
        pin_memory=plan.device.type == "cuda",
        worker_init_fn=worker_init if opts.num_workers > 0 else None,
    )
    compute = Compute(opts, plan)
    writer = Writer(
        opts.out, results, regions, plan.mask_format, opts.mask_space, last, plan.cfg.mask_space
    )
    label = "torchdefects run" + (f" [rank {r.rank}]" if r.distributed else "")
    progress = Progress(label, len(todo), quiet=opts.quiet, tty=opts.progress)
    done = 0
    it = None
    try:
        with torch.inference_mode():
            it = iter(loader)
            for batch in it:
                jobs = compute.batch(batch)
                with signals.held():
                    writer.put(jobs)
                done += len(jobs)
                progress.update(done, f"{writer.errors} errors")
    except BaseException:
        _stop_workers(it)
        with contextlib.suppress(BaseException):
            writer.close(discard=True)
        progress.close()
        raise
    writer.close()
    progress.close()
    return len(todo), len(shard) - len(todo), writer.in_order


def _finish_files(opts: RunOptions, plan: Plan, r: dist.Ranks, in_order: bool) -> None:
    """Rank 0: one results.jsonl (and regions.jsonl) in input order."""
    n = len(plan.paths)
    for stem in ("results", "regions") if opts.regions_jsonl else ("results",):
        final = os.path.join(opts.out, f"{stem}.jsonl")
        ranks = journal.rank_files(opts.out, stem)
        if ranks or not in_order:
            journal.merge_jsonl([final] + ranks, final, n)


def _totals(
    opts: RunOptions, plan: Plan, r: dist.Ranks, processed: int, skipped: int
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
