"""A lock file that works on NFS and that a dead holder cannot keep: the search's budget lock.

    with SymlinkLock(out / ".budget.lock"):
        ...  # count the trials, ask for one

Design choices:
- The lock is a symbolic link made with `os.symlink`, which is atomic on every NFS version; a
  search's workers may be jobs on several nodes sharing OUT over NFS, where fcntl/flock locks
  depend on the server's lock manager (SQLite's FAQ warns about them) and O_EXCL creation is
  not atomic before NFSv3. It is the primitive of Optuna's `JournalFileSymlinkLock`, which
  guards the study's journal.
- The link's target is not a file but the holder's identity, `HOST|PIDNS|PID|TOKEN`, read back
  with `os.readlink` and never followed. (Optuna's lock pointed at a file that did not exist:
  its `os.stat` of the link failed and it retried without sleeping, at full CPU, forever.)
- A dead holder cannot keep the lock: a holder on this machine (same host name and pid
  namespace) whose process is gone, or a zombie, is broken at once; any other holder is broken
  once the same holder has been seen holding it for `stale_s` seconds (the budget lock guards
  a count and an ask: milliseconds, seconds on a slow filesystem).
- Breaking is serialised by a second short lock (LOCK.break) under which the holder is checked
  again, so two waiters that saw the same dead holder never break the lock a third one just
  took. A holder whose lock was broken (it held it past `stale_s`) leaves the new holder's
  link in place when it releases.
- Waiting sleeps, from 1 ms doubling up to 0.1 s: a waiting worker costs no CPU.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

STALE_S = 60.0
"""How long a holder on another machine may hold the lock before it is taken for dead."""
MAX_SLEEP_S = 0.1
NOT_A_LINK = "<not a symbolic link>"


def _machine() -> str:
    """This process's host and pid namespace: where a pid means this process table."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "-"
    return f"{socket.gethostname()}|{namespace}"


def _holder(path: str) -> str | None:
    """The identity in the lock link (None: no lock)."""
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return None
    except OSError:  # something else at the lock's path: a holder that never lets go
        return NOT_A_LINK if os.path.lexists(path) else None


def _dead(holder: str) -> bool:
    """Whether a holder is a process of this machine that no longer runs (False: unknown)."""
    host, namespace, pid, *_ = [*holder.split("|"), "", "", ""]
    if f"{host}|{namespace}" != _machine() or not pid.isdigit():
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) S ...": the state follows the last parenthesis; Z and X are dead.
            if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                return True
    except (OSError, IndexError):
        pass
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _remove(path: str, holder: str) -> bool:
    """Remove the lock at `path` if `holder` still holds it; whether it was removed."""
    if _holder(path) != holder:
        return False
    try:
        os.unlink(path)
    except OSError:  # gone meanwhile, or a directory someone put there (never removed)
        return False
    return True


class SymlinkLock:
    """An exclusive lock on NFS (see the module docstring); a context manager."""

    def __init__(self, path: str | os.PathLike, stale_s: float = STALE_S) -> None:
        self.path = str(path)
        self.stale_s = stale_s
        self._token: str | None = None
        self._seen: dict[tuple[str, str], float] = {}

    def _stale(self, path: str, holder: str) -> bool:
        first = self._seen.setdefault((path, holder), time.monotonic())
        return _dead(holder) or time.monotonic() - first > self.stale_s

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for the lock (at most `timeout` seconds: False when it did not come)."""
        me = f"{_machine()}|{os.getpid()}|{uuid.uuid4().hex}"
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = 0.001
        self._seen.clear()
        while True:
            try:
                os.symlink(me, self.path)
            except FileExistsError:
                pass
            else:
                self._token = me
                return True
            holder = _holder(self.path)
            if holder is None:
                continue  # released between the two calls: try again at once
            if self._stale(self.path, holder) and self._break(holder):
                continue
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(sleep)
            sleep = min(2 * sleep, MAX_SLEEP_S)

    def _break(self, holder: str) -> bool:
        """Remove the lock of a dead `holder`, under the break lock; whether it was removed."""
        guard = self.path + ".break"
        me = f"{_machine()}|{os.getpid()}|{uuid.uuid4().hex}"
        try:
            os.symlink(me, guard)
        except FileExistsError:
            other = _holder(guard)  # held for microseconds, unless its holder died there
            if other is not None and self._stale(guard, other):
                _remove(guard, other)
            return False
        try:
            return _remove(self.path, holder)
        finally:
            _remove(guard, me)

    def release(self) -> None:
        """Let go (a lock broken as stale and taken by another holder is left to it)."""
        if self._token is not None:
            _remove(self.path, self._token)
            self._token = None

    def __enter__(self) -> SymlinkLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
