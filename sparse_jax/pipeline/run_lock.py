"""One process at a time per run folder: a lock file with its owner and a heartbeat.

Two processes started on the same run (the same results folder and settings, e.g. two
hosts of a sweep launched without ``--shard``) would otherwise both predict every sample
and append each prediction twice. The predict and evaluate stages of a run hold
``{run_dir}/run.lock``: a JSON file naming the owner (host, pid, a random token, start
time) created with ``O_EXCL``, whose modification time a background thread refreshes
every ``heartbeat_seconds``.

A second process *waits*: it logs one line naming the owner, polls until the lock is
free, then resumes the run like any interrupted run (only samples still missing are
predicted; a complete run is not predicted again). A lock is stale, and taken over,
when its heartbeat is older than ``stale_seconds`` or its owner is a dead process on
this host; the takeover renames the stale file away first, so of two processes that
both find it stale only one succeeds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0
POLL_SECONDS = 1.0

log = logging.getLogger(__name__)


def _owner_alive(owner: dict) -> bool:
    """False only when the owner is known dead: a missing process on this host."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _read_owner(path: Path) -> dict | None:
    """The lock's owner record, ``{}`` when unreadable (being written), ``None`` when absent."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}


def _try_create(path: Path, owner: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over_if_stale(path: Path, owner: dict, stale_seconds: float) -> bool:
    """Remove a stale lock (see the module docstring); True when one was removed."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if age < stale_seconds and (not owner or _owner_alive(owner)):
        return False
    moved = path.with_name(f"{path.name}.stale.{secrets.token_hex(4)}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return True
    if _read_owner(moved) != owner:  # another process replaced the stale lock first: give its lock back
        with contextlib.suppress(FileExistsError):
            os.link(moved, path)
    moved.unlink(missing_ok=True)
    log.warning("took over the stale lock %s of %s (heartbeat %.0f s old)", path, _describe(owner), age)
    return True


def _describe(owner: dict) -> str:
    return f"host {owner.get('host', '?')} pid {owner.get('pid', '?')}"


def _heartbeat(path: Path, token: str, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        owner = _read_owner(path)
        if owner and owner.get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)


@contextlib.contextmanager
def run_lock(
    run_dir: Path,
    *,
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
    stale_seconds: float = STALE_SECONDS,
    poll_seconds: float = POLL_SECONDS,
) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body; wait (one log line) while another process holds it."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "started": time.time()}
    announced = False
    while not _try_create(path, me):
        owner = _read_owner(path)
        if owner is None or _take_over_if_stale(path, owner, stale_seconds):
            continue
        if not announced:
            log.warning("%s is being run by %s; waiting for it, then predicting only the samples it left",
                        run_dir, _describe(owner))
            announced = True
        time.sleep(poll_seconds)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, token, stop, heartbeat_seconds), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if (_read_owner(path) or {}).get("token") == token:
            path.unlink(missing_ok=True)
