"""The run's journal and its failure modes: lock, manifest, resume, disk full, OOM, signals.

Each test here failed on the runner before torchdefects.batch (issue #8): two runs racing
into one folder both wrote, outputs inside the maps folder were read back as maps, a full
disk turned every later input into a permanent error record, --resume mixed settings, one
OOM failed a whole sub-batch, Ctrl-C with workers took 10 s and printed tracebacks.
"""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from torchdefects import files
from torchdefects.batch import RunOptions, RunStopped, journal, run_folder
from torchdefects.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _maps(d, n, h=8, w=8, seed=0):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = rng.random((h, w), dtype=np.float32)
        p = os.path.join(d, f"m{i:05d}.npy")
        np.save(p, a)
        out.append(p)
    return out


def _records(out):
    return files.read_jsonl(os.path.join(out, "results.jsonl")).records


def _env():
    env = dict(os.environ)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _opts(tmp_path, **kw):
    base = dict(out=str(tmp_path / "out"), maps=str(tmp_path / "maps"), pixel_threshold=0.5,
                quiet=True)  # fmt: skip
    base.update(kw)
    return RunOptions(**base)


# ----------------------------------------------------------------------------
# Lock
# ----------------------------------------------------------------------------

_HOLD = """
import sys, time
from torchdefects.batch.journal import RunLock
lock = RunLock(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_second_run_into_a_locked_folder_fails_naming_the_holder(tmp_path, capsys):
    _maps(tmp_path / "maps", 3)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=_env(),
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["run", "--maps", str(tmp_path / "maps"), "--out", str(out)]
        assert main([*args, "--pixel-threshold", "0.5", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host" in err and "in use by another torchdefects run" in err
        assert not (out / "results.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The OS released the lock of the killed holder: the next run works.
    assert main([*args, "--pixel-threshold", "0.5", "--quiet"]) == 0
    assert len(_records(str(out))) == 3


def test_two_racing_resume_runs_write_each_record_once(tmp_path):
    n = 120
    _maps(tmp_path / "maps", n)
    out = str(tmp_path / "out")
    cmd = [
        sys.executable,
        "-m",
        "torchdefects",
        "run",
        "--maps",
        str(tmp_path / "maps"),
        "--out",
        out,
        "--pixel-threshold",
        "0.5",
        "--batch-size",
        "4",
        "--resume",
        "--quiet",
    ]
    procs = [subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True) for _ in (0, 1)]
    results = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    errs = " ".join(e for _, e in results)
    # One ran; the other either found it running (2) or found the work done (0).
    assert codes in ([0, 0], [0, 2]), errs
    if codes == [0, 2]:
        assert "in use by another torchdefects run" in errs
    recs = _records(out)
    assert [r["index"] for r in recs] == list(range(n))


# ----------------------------------------------------------------------------
# Inputs and outputs in one folder
# ----------------------------------------------------------------------------


def test_out_inside_maps_is_never_read_back(tmp_path):
    maps = tmp_path / "maps"
    _maps(maps, 3)
    out = maps / "out"
    masks = maps / "mymasks"
    opts = RunOptions(out=str(out), maps=str(maps), pixel_threshold=0.5, save_masks=str(masks),
                      mask_format="npy", save_overlays=True, quiet=True)  # fmt: skip
    for k in range(3):
        s = run_folder(dataclasses.replace(opts, resume=k > 0))
        assert s.total == 3 and s.processed == (3 if k == 0 else 0)
    assert len(_records(str(out))) == 3
    assert len(os.listdir(masks)) == 3 and len(os.listdir(out / "overlays")) == 3


# ----------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------


def test_resume_with_other_settings_is_refused_listing_fields(tmp_path, capsys):
    _maps(tmp_path / "maps", 4)
    args = ["run", "--maps", str(tmp_path / "maps"), "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*args, "--pixel-threshold", "0.6"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    cfg = manifest["settings"]["config"]
    # Every DefectsConfig field is recorded (min_area and kernel sizes included).
    from torchdefects.config import DefectsConfig

    names = {f.name for f in dataclasses.fields(DefectsConfig) if not f.name.startswith("_")}
    assert names - {"pixel_threshold_provenance"} <= set(cfg)
    assert manifest["versions"]["torch"] == torch.__version__
    capsys.readouterr()
    assert main([*args, "--pixel-threshold", "0.9", "--defect-min-area", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "config.pixel_threshold: 0.6 -> 0.9" in err
    assert "config.min_area: 0 -> 3" in err
    assert "pixel_threshold: 0.6 -> 0.9" in err
    assert main([*args, "--pixel-threshold", "0.6", "--resume"]) == 0
    assert len(_records(str(tmp_path / "out"))) == 4


def test_usage_error_leaves_out_untouched(tmp_path, capsys):
    _maps(tmp_path / "maps", 2)
    out = tmp_path / "out"
    base = ["run", "--maps", str(tmp_path / "maps"), "--out", str(out), "--quiet"]
    for extra in (
        [],  # no threshold
        ["--pixel-threshold", "0.5", "--defect-open-ksize", "2"],
        ["--pixel-threshold", "0.5", "--device", "tpu"],
        ["--pixel-threshold", "0.5", "--config", str(tmp_path / "missing.json")],
        ["--pixel-threshold", "0.5", "--defects-mask-space", "all"],
        ["--pixel-threshold-strategy", "normal_pixel_quantile"],
    ):
        assert main([*base, *extra]) == 2, extra
        assert not out.exists(), extra
    assert main([*base, "--pixel-threshold", "0.5"]) == 0


# ----------------------------------------------------------------------------
# Transient failures
# ----------------------------------------------------------------------------


def test_disk_full_stops_the_run_and_resume_finishes(tmp_path, monkeypatch, capsys):
    _maps(tmp_path / "maps", 20)
    real = files.write_mask
    calls = []

    def full_after_7(path, mask, fmt="png", durable=True):
        calls.append(path)
        if len(calls) > 7:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, mask, fmt, durable)

    monkeypatch.setattr(files, "write_mask", full_after_7)
    opts = _opts(tmp_path, save_masks="png", batch_size=4)
    with pytest.raises(RunStopped, match=r"No space left on device \(ENOSPC\).*--resume"):
        run_folder(opts)
    assert len(calls) == 8  # stopped at the first failure, nothing after it tried
    recs = _records(opts.out)
    assert len(recs) == 4 and not any("error" in r for r in recs)  # one whole batch
    # Through the CLI: exit 1, one clear line.
    assert main(["run", "--maps", opts.maps, "--out", opts.out, "--pixel-threshold", "0.5",
                 "--save-masks", "png", "--resume", "--quiet"]) == 1  # fmt: skip
    assert "ENOSPC" in capsys.readouterr().err
    monkeypatch.setattr(files, "write_mask", real)
    s = run_folder(dataclasses.replace(opts, resume=True))
    assert s.exit_code == 0 and s.errors == 0
    recs = _records(opts.out)
    assert [r["index"] for r in recs] == list(range(20))
    assert len(os.listdir(os.path.join(opts.out, "masks"))) == 20


def test_input_owned_write_error_stays_recorded(tmp_path, monkeypatch):
    _maps(tmp_path / "maps", 3)
    real = files.write_mask

    def bad_name(path, mask, fmt="png", durable=True):
        if "m00001" in path:
            raise OSError(errno.ENAMETOOLONG, "File name too long", path)
        return real(path, mask, fmt, durable)

    monkeypatch.setattr(files, "write_mask", bad_name)
    s = run_folder(_opts(tmp_path, save_masks="png"))
    assert s.exit_code == 3 and s.errors == 1
    err = _records(str(tmp_path / "out"))[1]["error"]
    assert err["type"] == "write_error" and err["transient"] is False


def test_oom_sub_batch_is_retried_per_input(tmp_path, monkeypatch):
    from torchdefects.head import DefectHead

    paths = _maps(tmp_path / "maps", 7)
    real = DefectHead.forward
    seen = []

    def oom_on_batches(self, x, *a, **k):
        seen.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(self, x, *a, **k)

    monkeypatch.setattr(DefectHead, "forward", oom_on_batches)
    s = run_folder(_opts(tmp_path, batch_size=4))
    assert s.exit_code == 0 and s.errors == 0
    assert seen == [4, 1, 1, 1, 1, 3, 1, 1, 1]
    monkeypatch.setattr(DefectHead, "forward", real)
    recs = _records(str(tmp_path / "out"))
    for rec, p in zip(recs, paths):
        want = DefectHead(dataclasses.replace(_cfg(), pixel_threshold=0.5))(
            torch.from_numpy(np.load(p))[None, None]
        )
        assert rec["defects"]["map_stats_roi"]["max"] == float(str(want.roi_max[0].numpy()))


def _cfg():
    from torchdefects.config import DefectsConfig

    return DefectsConfig()


def test_oom_of_one_input_is_transient_and_resume_retries_it(tmp_path, monkeypatch):
    from torchdefects.head import DefectHead

    _maps(tmp_path / "maps", 5)
    real = DefectHead.forward
    state = {"fail": True}

    def oom_on_third(self, x, *a, **k):
        if state["fail"] and x.shape[0] == 1 and float(x.sum()) == self._third:
            raise torch.OutOfMemoryError("out of memory (fake)")
        if state["fail"] and x.shape[0] > 1:
            raise torch.OutOfMemoryError("out of memory (fake)")
        return real(self, x, *a, **k)

    third = float(torch.from_numpy(np.load(tmp_path / "maps" / "m00002.npy")).sum())
    monkeypatch.setattr(DefectHead, "_third", third, raising=False)
    monkeypatch.setattr(DefectHead, "forward", oom_on_third)
    opts = _opts(tmp_path, batch_size=5)
    s = run_folder(opts)
    assert s.exit_code == 3 and s.errors == 1
    err = _records(opts.out)[2]["error"]
    assert err == {"type": "out_of_memory", "message": "out of memory", "transient": True}
    state["fail"] = False
    s = run_folder(dataclasses.replace(opts, resume=True))
    assert s.exit_code == 0 and s.processed == 1 and s.skipped == 4
    recs = _records(opts.out)
    assert [r["index"] for r in recs] == list(range(5)) and not any("error" in r for r in recs)


# ----------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_with_workers_stops_fast_and_resumes(tmp_path, sig, device):
    # On CUDA the loader also runs a pin-memory thread, which the stop must not trip up.
    n = 3000
    _maps(tmp_path / "maps", n, h=16, w=16)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "torchdefects", "run", "--maps", str(tmp_path / "maps"),
           "--out", out, "--pixel-threshold", "0.5", "--batch-size", "8", "--num-workers", "2",
           "--save-masks", "png", "--quiet", "--device", device]  # fmt: skip
    p = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    results = os.path.join(out, "results.jsonl")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and p.poll() is None:
        if os.path.exists(results) and os.path.getsize(results) > 0:
            break
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read()
    t0 = time.monotonic()
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    took = time.monotonic() - t0
    assert p.returncode == (130 if sig == signal.SIGINT else 143), err
    assert took < 2.0, (took, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--resume" in lines[0], err
    done = len(_records(out))
    assert 0 < done < n
    r = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [rec["index"] for rec in _records(out)] == list(range(n))


def _returns_within(fn, seconds):
    """Run ``fn`` on a daemon thread; whether it returned within ``seconds`` (its exception,
    if it raised one, is raised here)."""
    import threading

    raised = []

    def target():
        try:
            fn()
        except BaseException as e:
            raised.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if raised:
        raise raised[0]
    return not t.is_alive()


class _Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        time.sleep(0.001)
        return torch.full((4,), float(i))


def test_stop_workers_never_waits_on_a_lock_a_killed_worker_held():
    """The CI hang: a worker killed inside ``done_event.is_set()`` keeps the Event's lock, and
    torch's shutdown (``_workers_done_event.set()``) then waits forever. Holding that lock
    here stands for the killed worker."""
    from torchdefects.batch.data import worker_init
    from torchdefects.batch.folder import _stop_workers

    loader = torch.utils.data.DataLoader(_Slow(), batch_size=4, num_workers=2,
                                         worker_init_fn=worker_init)  # fmt: skip
    it = iter(loader)
    next(it)
    workers = list(it._workers)
    lock = it._workers_done_event._cond
    assert lock.acquire(timeout=5)
    try:
        assert _returns_within(lambda: _stop_workers(it), 10), "stop waited on the lock"
    finally:
        lock.release()
    assert not any(w.is_alive() for w in workers)
    # SIGTERM's default action, torch's own handler (exit 0) before worker_init ran, or the
    # SIGKILL that follows when a worker outlives the wait (a very busy machine).
    assert {w.exitcode for w in workers} <= {-signal.SIGTERM, 0, -signal.SIGKILL}
    it.__del__()  # torch's shutdown sees the iterator shut down and does nothing more


def test_a_signal_inside_a_held_section_is_raised_on_the_way_out():
    from torchdefects.batch.folder import _Signals
    from torchdefects.batch.options import RunInterrupted

    s = _Signals()
    with pytest.raises(RunInterrupted) as e, s.held():
        with s.held():
            s.handler(signal.SIGTERM, None)  # deferred: no raise inside
            s.handler(signal.SIGINT, None)  # the first one counts
        reached_outer_body = True
    assert reached_outer_body and e.value.signum == signal.SIGTERM
    s.handler(signal.SIGINT, None)  # once fired, later signals are ignored
    with s.held():
        pass
    s2 = _Signals()
    with pytest.raises(RunInterrupted):
        s2.handler(signal.SIGINT, None)  # outside a held section: at once


def test_writer_discard_close_takes_no_lock_the_main_thread_may_hold(tmp_path):
    """A signal can land between ``Lock.__enter__`` and the ``with`` block, leaving the
    writer queue's mutex held by the interrupted main thread; a discarding close must still
    return (it used to put a sentinel into that queue)."""
    from torchdefects.batch.writer import Writer

    w = Writer(str(tmp_path), str(tmp_path / "results.jsonl"), None, None, "anomaly_map")
    assert w._queue.mutex.acquire(timeout=5)
    try:
        assert _returns_within(lambda: w.close(discard=True, wait=1.0), 10)
    finally:
        w._queue.mutex.release()


# ----------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------


def test_bookkeeping_does_not_grow_per_input(tmp_path):
    """Cheap proxy of scripts/bench_memory.py: Python heap peak (tracemalloc) of a run over
    n1 and n2 tiny maps; beyond the path list it may grow by at most 1 KB per input."""
    import tracemalloc

    def peak(n):
        d = tmp_path / f"maps{n}"
        paths = _maps(d, n, h=4, w=4)
        path_bytes = sum(sys.getsizeof(p) + 8 for p in paths)
        del paths
        tracemalloc.start()
        run_folder(RunOptions(out=str(tmp_path / f"out{n}"), maps=str(d), pixel_threshold=0.5,
                              batch_size=64, regions_jsonl=True, quiet=True))  # fmt: skip
        _, pk = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return pk, path_bytes

    p1, b1 = peak(200)
    p2, b2 = peak(1200)
    per_input = ((p2 - b2) - (p1 - b1)) / 1000
    assert per_input < 1024, per_input


def test_scan_and_merge_keep_order_and_first_record(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"index": i, "input": f"x{i}"}) + "\n" for i in (0, 3, 4)))
    lines_b = [
        {"index": 1, "input": "x1"},
        {"index": 3, "input": "dup"},
        {"index": 2, "input": "x2", "error": {"type": "out_of_memory", "transient": True}},
    ]
    b.write_text("".join(json.dumps(r) + "\n" for r in lines_b) + '{"index": 5, "inp')
    state = journal.scan([str(a), str(b)], 6)
    assert state.tolist() == [journal.OK, journal.OK, journal.TRANSIENT, journal.OK, journal.OK, 0]
    journal.merge_jsonl([str(a), str(b)], str(a), 6)
    got = [json.loads(x) for x in a.read_text().splitlines()]
    assert [r["index"] for r in got] == [0, 1, 2, 3, 4]
    assert got[3]["input"] == "x3" and not b.exists()


def test_calibrate_maps_equals_numpy_quantile(tmp_path):
    from torchdefects.batch import CalibrationFailed, calibrate_maps

    rng = np.random.default_rng(3)
    arrays = [rng.random((9, 7), dtype=np.float32) for _ in range(4)] + [
        rng.random((5, 11), dtype=np.float32)
    ]
    for q in (0.0, 0.5, 0.9, 0.999, 1.0):
        res = calibrate_maps(arrays, q=q, roi_xyxy_norm=[0.2, 0.0, 1.0, 0.6], batch_size=2)
        want = np.quantile(
            np.concatenate(
                [
                    a[: int(np.ceil(0.6 * a.shape[0])), int(np.floor(0.2 * a.shape[1])) :].ravel()
                    for a in arrays
                ]
            ).astype(np.float64),
            q,
        )
        assert res.threshold == float(want) and res.used == 5 and res.failed == []
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"junk")
    res = calibrate_maps([str(bad), *arrays], q=0.5)
    assert res.used == 5 and len(res.failed) == 1 and str(bad) in res.failed[0]
    with pytest.raises(CalibrationFailed, match="none of the 1 maps could be used"):
        calibrate_maps([str(bad)])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        calibrate_maps(arrays, batch_size=0)
