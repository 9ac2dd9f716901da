"""The journal of a run in its output folder: lock, manifest, resume, rank files, merge.

``OUT/.torchdefects.lock``
    held with ``fcntl.flock`` (exclusive) for the whole run by one process (rank 0 under
    torchrun); the OS releases it when that process dies, SIGKILL included. It holds the
    holder's pid and host, which a second run into the same folder names in its error.
``OUT/manifest.json``
    the effective settings (every ``DefectsConfig`` field, the threshold and its
    provenance, the output options, a fingerprint of the input list) and the versions.
    ``--resume`` with other settings is refused, listing the fields that differ.
``OUT/results.jsonl`` (and ``results.rank{R}.jsonl`` while a torchrun is going)
    one line per input, with its ``index``; a resumed run skips every index with a
    result or an input error, and retries transient errors (their lines are dropped).

Memory: the resume state is one byte per input (:func:`scan`) and the ordered merge
14 bytes per input (offsets); no record is kept in memory beyond its batch.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from torchdefects.batch.options import RunUsageError

__all__ = [
    "ERROR",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "MISSING",
    "OK",
    "TRANSIENT",
    "RunLock",
    "check_manifest",
    "fingerprint",
    "iter_lines",
    "merge_jsonl",
    "prepare_fresh",
    "prepare_resume",
    "rank_files",
    "scan",
    "sweep_temp_files",
    "write_manifest",
]

LOCK_NAME = ".torchdefects.lock"
MANIFEST_NAME = "manifest.json"
#: Per-input state from :func:`scan`.
MISSING, OK, ERROR, TRANSIENT = 0, 1, 2, 3


class RunLock:
    """Exclusive lock on an output folder, held until :meth:`release` or process death.

    Raises:
        RunUsageError: another live process holds it; the message names its pid and host.
    """

    def __init__(self, out: str) -> None:
        self.path = os.path.join(out, LOCK_NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunUsageError(
                f"{out} is in use by another torchdefects run ({holder}); wait for it to end "
                "or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.write(fd, json.dumps(info).encode())
        self._fd: Optional[int] = fd

    def release(self) -> None:
        """Unlock (the file stays; an unlocked file is free)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
    except (OSError, ValueError):
        return "holder unknown"


# ----------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------


def fingerprint(paths: Sequence[str]) -> str:
    """SHA-256 of the input list (paths in order), streamed."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def write_manifest(out: str, settings: Dict[str, Any], versions: Dict[str, str]) -> None:
    """Write ``manifest.json``: ``settings`` (compared on resume) and ``versions``."""
    from torchdefects.files import atomic_write_json

    atomic_write_json(
        os.path.join(out, MANIFEST_NAME), {"settings": settings, "versions": versions}
    )


def check_manifest(out: str, settings: Dict[str, Any]) -> None:
    """Refuse to resume a run made with other settings (or without a manifest).

    Raises:
        RunUsageError: naming every differing field with both values.
    """
    path = os.path.join(out, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)["settings"]
    except FileNotFoundError:
        raise RunUsageError(
            f"{out} has results but no {MANIFEST_NAME} (written by an older torchdefects): "
            "its settings are unknown, so it cannot be resumed; use --overwrite"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunUsageError(f"{path}: unreadable manifest ({e}); use --overwrite") from e
    a, b = _flat(old), _flat(json.loads(json.dumps(settings)))
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        listed = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff)
        raise RunUsageError(
            f"--resume with other settings than the run in {out}: {listed}; "
            "use the same settings, or --overwrite, or another --out"
        )


# ----------------------------------------------------------------------------
# Scanning and rewriting JSONL files
# ----------------------------------------------------------------------------


def iter_lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """(offset, line) of every complete line; a torn last line is not yielded."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        off = 0
        for line in f:
            if not line.endswith(b"\n"):
                return
            yield off, line
            off += len(line)


def _state(line: bytes) -> Tuple[int, int]:
    try:
        rec = json.loads(line)
        index = int(rec["index"])
    except (ValueError, KeyError, TypeError):
        return -1, MISSING
    err = rec.get("error")
    if err is None:
        return index, OK
    return index, TRANSIENT if err.get("transient") else ERROR


def scan(paths: Sequence[str], n: int) -> np.ndarray:
    """Per-input state over the JSONL files ``paths``: :data:`OK` wins over an error, an
    input error over a transient one. ``(n,)`` uint8."""
    state = np.zeros(n, dtype=np.uint8)
    rank = np.array([0, 3, 2, 1], dtype=np.uint8)  # MISSING < TRANSIENT < ERROR < OK
    for p in paths:
        for _, line in iter_lines(p):
            i, s = _state(line)
            if 0 <= i < n and rank[s] > rank[state[i]]:
                state[i] = s
    return state


@contextlib.contextmanager
def _replace(path: str) -> Iterator[Any]:
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(path) or ".")  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _filter(path: str, keep: Any) -> None:
    """Rewrite ``path`` with the complete lines ``keep(index, state)`` accepts."""
    if not os.path.exists(path):
        return
    size = os.path.getsize(path)
    kept = [(o, line) for o, line in iter_lines(path) if keep(*_state(line))]
    # Cheap check first: nothing dropped and no torn tail -> leave the file alone.
    if sum(len(line) for _, line in kept) == size:
        return
    with _replace(path) as f:
        for _, line in iter_lines(path):
            if keep(*_state(line)):
                f.write(line)


def rank_files(out: str, stem: str) -> List[str]:
    """``OUT/{stem}.rank{R}.jsonl`` files, sorted."""
    if not os.path.isdir(out):
        return []
    names = [
        n
        for n in os.listdir(out)
        if n.startswith(stem + ".rank") and n.endswith(".jsonl") and n[len(stem) + 5 : -6].isdigit()
    ]
    return [os.path.join(out, n) for n in sorted(names)]


def sweep_temp_files(folders: Sequence[str]) -> None:
    """Remove the temporary files of atomic writes cut short by a kill (``.NAME.*.tmp``)."""
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(root, name))


def prepare_fresh(out: str, overwrite: bool) -> None:
    """Start over in ``out``: refuse if it holds results (unless ``overwrite``)."""
    results = [os.path.join(out, "results.jsonl")] + rank_files(out, "results")
    if any(os.path.exists(p) for p in results) and not overwrite:
        raise RunUsageError(
            f"{out} already holds results; pass --resume to continue or --overwrite"
        )
    stale = results + [os.path.join(out, "regions.jsonl"), os.path.join(out, MANIFEST_NAME)]
    for p in stale + rank_files(out, "regions"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


def prepare_resume(out: str, n: int, temp_folders: Sequence[str]) -> np.ndarray:
    """Make ``out`` consistent for a resumed run; return the per-input state.

    Torn last lines are cut, transient error lines dropped (those inputs run again), region
    lines without a result line dropped, temp files of killed writes removed.
    """
    results = [os.path.join(out, "results.jsonl")] + rank_files(out, "results")
    for p in results:
        _filter(p, lambda i, s: s in (OK, ERROR))
    state = scan(results, n)
    for p in [os.path.join(out, "regions.jsonl")] + rank_files(out, "regions"):
        _filter(p, lambda i, s: 0 <= i < n and state[i] == OK)
    sweep_temp_files(temp_folders)
    return state


def merge_jsonl(sources: Sequence[str], dest: str, n: int) -> None:
    """Write ``dest`` with the lines of ``sources`` in index order (the first source that
    has an index wins; an index's consecutive lines, e.g. its regions, stay together), then
    remove the sources other than ``dest``. Memory: 14 bytes per input."""
    src = np.full(n, -1, dtype=np.int16)
    off = np.zeros(n, dtype=np.int64)
    cnt = np.zeros(n, dtype=np.int32)
    existing = [p for p in sources if os.path.exists(p)]
    for k, p in enumerate(existing):
        prev = -1
        for o, line in iter_lines(p):
            i, _ = _state(line)
            if not 0 <= i < n:
                continue
            if src[i] == -1:
                src[i], off[i], cnt[i] = k, o, 1
            elif src[i] == k and prev == i:
                cnt[i] += 1
            prev = i
    handles = [open(p, "rb") for p in existing]  # noqa: SIM115
    try:
        with _replace(dest) as f:
            for i in np.flatnonzero(src >= 0).tolist():
                h = handles[src[i]]
                h.seek(int(off[i]))
                for _ in range(int(cnt[i])):
                    f.write(h.readline())
    finally:
        for h in handles:
            h.close()
    for p in existing:
        if os.path.abspath(p) != os.path.abspath(dest):
            os.remove(p)
