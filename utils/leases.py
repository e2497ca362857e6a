"""Leases: each run is trained by one process at a time, on one machine or many sharing a filesystem.

A lease is a small JSON file in the run's directory (holder's host, pid, a random token, start and
heartbeat times). It is created by hard-linking a complete temporary file to the lease's name:
link() is atomic and fails when the name exists, also on NFS, so no `flock` is needed. The holder
refreshes the heartbeat while it trains. Another process takes a lease over when its holder is
dead (same host, process gone) or its heartbeat is older than `stale_after` seconds: it renames
the old lease away (only one renamer can succeed), checks that what it renamed is the lease it
judged stale, and then claims the run as if it were free.
"""
import json
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from utils.io import HOST, atomic_write_json, process_alive

LEASE_NAME = "lease.json"
# A heartbeat more than this many seconds ahead of this host's clock cannot be right (hosts sharing a
# filesystem keep their clocks within seconds of each other): such a lease is judged by its file's
# modification time instead, as a NaN or unreadable heartbeat is.
FUTURE_HEARTBEAT_S = 3600.0


class LeaseLost(Exception):
    """Another process took this lease over (our heartbeat was judged stale)."""


@dataclass
class Holder:
    """Who holds a lease, as read from its file."""
    host: str
    pid: int
    token: str
    started: float
    heartbeat: float

    def describe(self) -> str:
        return f"{self.host}:{self.pid}"

    def is_dead(self, stale_after: float, now: float) -> bool:
        if self.host == HOST and not process_alive(self.pid):
            return True
        return now - self.heartbeat > stale_after


def read_holder(path: Path) -> Optional[Holder]:
    """The lease's holder, or None when there is no lease (or it vanished while being read). A
    heartbeat that cannot be right (not a number, NaN, far in the future) is replaced by the file's
    modification time, so such a lease still goes stale after the timeout."""
    try:
        data = json.loads(path.read_text())
        holder = Holder(str(data["host"]), int(data["pid"]), str(data["token"]), float(data["started"]),
                        float(data["heartbeat"]))
        if math.isfinite(holder.heartbeat) and holder.heartbeat <= time.time() + FUTURE_HEARTBEAT_S:
            return holder
        holder.heartbeat = path.stat().st_mtime
        return holder
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        # not ours or damaged: held by nobody we can name; judged by its age alone
        try:
            age_base = path.stat().st_mtime
        except FileNotFoundError:
            return None
        return Holder("?", -1, "", age_base, age_base)


class Lease:
    """A lease this process holds on one run directory."""

    def __init__(self, folder: Path, token: str, started: float):
        self.path = Path(folder) / LEASE_NAME
        self.token, self.started = token, started

    def _content(self, now: float) -> dict:
        return {"host": HOST, "pid": os.getpid(), "token": self.token, "started": self.started,
                "heartbeat": now}

    def still_mine(self) -> bool:
        holder = read_holder(self.path)
        return holder is not None and holder.token == self.token

    def heartbeat(self) -> None:
        """Refresh the heartbeat; LeaseLost when another process has taken the run over."""
        if not self.still_mine():
            raise LeaseLost(str(self.path))
        atomic_write_json(self.path, self._content(time.time()))

    def release(self) -> None:
        if self.still_mine():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Heartbeat:
    """Refreshes the heartbeat of leases from a background thread while a chunk trains, so that an
    epoch longer than the lease timeout does not make the runs look abandoned. `check()` (called
    between epochs) raises LeaseLost once another process has taken one of them over."""

    def __init__(self, leases, every: float):
        self.leases, self.every = list(leases), every
        self.lost = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    def _beat(self):
        while not self._stop.wait(self.every):
            try:
                for lease in self.leases:
                    lease.heartbeat()
            except LeaseLost as exc:
                self.lost = exc
                return
            except OSError:
                continue  # a passing filesystem hiccup: try again at the next beat

    def check(self) -> None:
        if self.lost is not None:
            raise self.lost

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def _create(folder: Path) -> Optional[Lease]:
    """Create the lease if nobody holds one (atomic link of a complete file)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    lease = Lease(folder, secrets.token_hex(8), now)
    tmp = folder / f".{LEASE_NAME}.{HOST}.{os.getpid()}.{lease.token}.tmp"
    tmp.write_text(json.dumps(lease._content(now)))
    try:
        os.link(tmp, lease.path)
    except FileExistsError:
        return None
    finally:
        os.unlink(tmp)
    return lease


def _take_over(path: Path, stale: Holder) -> bool:
    """Remove a stale lease, unless it changed hands since it was judged stale."""
    aside = path.with_name(f".{LEASE_NAME}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # another process removed it first; the caller tries to claim as usual
    moved = read_holder(aside)
    if moved is not None and moved.token != stale.token:
        # a new holder's lease was renamed by mistake: put it back unless someone claimed meanwhile
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        os.unlink(aside)
        return False
    os.unlink(aside)
    return True


def try_claim(folder, stale_after: float):
    """(Lease, None) when this process now holds the run, else (None, Holder of the live lease)."""
    folder = Path(folder)
    path = folder / LEASE_NAME
    for _ in range(3):  # a race with another claimer is retried a few times, then reported as held
        lease = _create(folder)
        if lease is not None:
            return lease, None
        holder = read_holder(path)
        if holder is None:
            continue  # released between our attempt and the read
        if not holder.is_dead(stale_after, time.time()):
            return None, holder
        _take_over(path, holder)
    holder = read_holder(path)
    return None, holder or Holder("?", -1, "", 0.0, 0.0)
