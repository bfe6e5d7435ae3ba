"""Files written whole or not at all, and content hashes (the build's and the engines' bookkeeping)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A reader never sees a half-written file: either the old one, or the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            # mkstemp makes 0600, and a writer may replace the file with its own (safetensors does):
            # the final file follows the umask like every other output
            if tmp_path.is_file():
                os.chmod(tmp_path, file_mode())
        except OSError as e:
            if e.errno == errno.ENOSPC and not e.filename:  # name the file being written
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise
        fault_point(path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def fault_point(path: Path) -> None:
    """Fault injection for the resume tests: AMP_DEPLOY_KILL_BEFORE=NAME[:SIG][@N] sends this process
    SIGKILL (or SIG, e.g. INT) just before NAME would be renamed into place (the N-th time, default 1)."""
    spec = os.environ.get("AMP_DEPLOY_KILL_BEFORE", "")
    spec, _, nth = spec.partition("@")
    name, _, sig = spec.partition(":")
    if name != path.name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(nth or 1):
        import signal

        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


_FAULT_COUNTS: dict[str, int] = {}


def remove_stray_temps(folder: Path) -> list[Path]:
    """Delete temporary files left by a killed writer (only call while holding the folder lock)."""
    stray = [p for p in folder.glob(".*.tmp") if p.is_file()] + [p for p in folder.glob(".*.tmpdir") if p.is_dir()]
    for p in stray:
        if p.is_dir():
            import shutil

            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stray


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def hash_obj(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (recipe sections, stage inputs)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_file_cached(path: str | Path, cache: dict) -> str:
    """hash_file, reusing a hash recorded in `cache` while the file's size and mtime are unchanged.

    Multi-GB weights and ONNX files would otherwise be read in full by every build.
    """
    path = Path(path)
    if path.is_dir():  # a checkpoint folder (config.json, weights, processor): the hash of its files
        return hash_obj({p.relative_to(path).as_posix(): hash_file_cached(p, cache)
                         for p in sorted(path.rglob("*")) if p.is_file()})
    st = path.stat()
    key = str(path.resolve())
    hit = cache.get(key)
    if isinstance(hit, list) and hit[:2] == [st.st_size, st.st_mtime_ns]:
        return hit[2]
    digest = content_hash(path)
    cache[key] = [st.st_size, st.st_mtime_ns, digest]
    return digest


TIMING_KEYS = ("seconds",)  # JSON keys (and keys ending in _seconds) that record how long, not what


def content_hash(path: str | Path) -> str:
    """What a stage's file holds, hashed so that a re-run whose result is the same hashes the same:
    a JSON document without its timings (`seconds`, `*_seconds`), a safetensors file with its header
    (metadata included, timings left out) in sorted key order (safetensors writes its metadata in no
    fixed order),
    any other file byte for byte."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return hash_file(path)
        return hash_obj({"json": _without_timings(doc)})
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                if isinstance(header.get("__metadata__"), dict):  # e.g. the scores' "seconds"
                    header["__metadata__"] = _without_timings(header["__metadata__"])
                h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()[:16]
        except (OSError, ValueError, UnicodeDecodeError):
            return hash_file(path)
    return hash_file(path)


def _without_timings(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _without_timings(v) for k, v in doc.items()
                if not (k in TIMING_KEYS or k.endswith("_seconds"))}
    if isinstance(doc, list):
        return [_without_timings(v) for v in doc]
    return doc


def path_digest(value: str | Path, cache: dict) -> str:
    """What a stage reads from a path the recipe names, as a short hash.

    A file (weights, a class-names list): its contents (`hash_file_cached`, read again only when
    its size or mtime changed). A folder (images, a checkpoint folder): the relative name, size and
    modification time (ns) of every file below it, links followed, without reading any file: one
    stat per file, so an ImageNet-sized folder costs seconds where hashing its contents would read
    it all on every new machine. An image rewritten in place changes its mtime (and usually its
    size); a copy that keeps both (`cp -p`, `touch -r`, `rsync -t` of other contents) goes unseen.
    """
    path = Path(value)
    if path.is_file():
        return hash_file_cached(path, cache)
    if not path.is_dir():
        return "missing"
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        rel = Path(root).relative_to(path).as_posix()
        for name in sorted(files):
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue  # a dangling link: nothing a loader could read
            h.update(f"{rel}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def hash_bytes(blob: bytes) -> str:
    """The same short sha256 as `hash_file`, of bytes in memory (a serialized engine)."""
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_mode() -> int:
    """The permissions a new file gets under the current umask (what every output follows)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a name that is also a folder name: out/NAME, Triton entries
