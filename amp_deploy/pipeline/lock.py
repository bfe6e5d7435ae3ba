"""One build per output folder: a lock file that names its owner, taken over when the owner is gone."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from amp_deploy.errors import UserError


class FolderLock:
    """One build per output folder.

    The lock is an advisory `flock` on `.lock`, held for the whole build: the kernel releases it
    when its process dies, so a stale lock needs no takeover at all and two processes can never both
    hold it (the owner file alone could be taken twice: two processes that read the same stale owner
    both unlinked it and went on). Under the flock the file names its owner (host, pid, process
    start time) for the message a second build gets, and a lock file naming a live process on this
    host (or any on another host, on a disk shared with a filesystem without flock) is still
    respected only where the filesystem has no flock: when the kernel's lock was free, the owner file
    is stale whoever it names (a build killed in another container, under another host name). After
    taking the flock, the path must still be the file locked: a holder that just
    finished unlinks it, and a lock on the unlinked file would guard nothing.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                held = _flock(fd)
                if held is False:
                    raise self._busy(self._owner())
                if not _same_file(fd, self.path):
                    continue  # unlinked (or replaced) by the build that held it: lock the new one
                owner = self._owner()
                # The kernel's lock was free: whatever the owner file says (a build killed in another
                # container, another host name) is stale. Only without flock does the file decide.
                if held is None and owner is not None and owner.get("pid") != os.getpid() and _alive(owner):
                    raise self._busy(owner, unlocked=True)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                          "start": _start_time(os.getpid())}).encode(), 0)
                self._fd, fd = fd, None
                return self
            finally:
                if fd is not None:
                    os.close(fd)
        raise UserError(f"{self.path}: could not take the folder lock")

    def _busy(self, owner: dict | None, unlocked: bool = False) -> UserError:
        who = f"pid {owner['pid']}" + (f" on {owner['host']}" if owner.get("host") else "") if owner else "another process"
        stale = (f"; this filesystem has no flock, so {self.path.name} alone says so: if no build is running, delete "
                 f"{self.path}" if unlocked else "")
        return UserError(f"{self.path.parent}: another build ({who}) is using this folder; wait for it or "
                         f"choose another --out{stale}")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
        except (OSError, ValueError):
            return None  # unreadable, empty or half-written: its writer died

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: a waiter then sees it was unlinked
        os.close(self._fd)
        self._fd = None


def _flock(fd: int) -> bool | None:
    """Take an exclusive flock without waiting: True when taken, False when another process holds it,
    None where the filesystem has no flock (some network and FUSE mounts: the owner file alone decides)."""
    import errno
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _start_time(pid: int) -> str | None:
    try:  # field 22 of /proc/PID/stat: start time in clock ticks since boot (Linux)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    if owner.get("host") not in (None, socket.gethostname()):
        return True  # another machine's build on a shared disk: never steal it
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _start_time(pid)
    return start is None or owner.get("start") in (None, start)
