"""One build per output folder: a lock file that names its owner, taken over when the owner is gone."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from amp_deploy.errors import UserError


class FolderLock:
    """One build per output folder. The lock file names its owner (host, pid, process start time);
    a lock whose owner is gone, or whose pid now belongs to another process, is taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"

    def __enter__(self) -> FolderLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise UserError(f"{self.path.parent}: another build (pid {owner['pid']}) is using this "
                                    "folder; wait for it or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}, f)
            return self
        raise UserError(f"{self.path}: could not take the folder lock")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
        except (OSError, ValueError):
            return None  # unreadable or half-written: its writer died

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


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
