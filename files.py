"""Writing files safely: a reader, a resumed run or a power cut never meets half a file, and two
processes never write into the same folder at once.

A file that matters (checkpoint, log, prepared data, export) is written under a temporary name in
the same folder, flushed to the disk (fsync), then renamed over its final name. A rename is atomic,
so the final name always holds either the old complete file or the new complete one. A folder that
a program writes into is locked for as long as it writes (`lock`): a second program is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from errors import UserError


class FileError(UserError):
    """A file or folder that cannot be written; the message names it and what to do."""


class Writer:
    """A file's write(), remembering an OSError: torch.save reports a full disk as a RuntimeError
    of its own, and this keeps the real cause."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Writer]:
    """Open a temporary file for writing bytes; on success it replaces `path`, on failure it goes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share it
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = Writer(f)
            yield writer
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the name points at them
        os.replace(tmp, path)
        sync_folder(path.parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    except RuntimeError:
        if writer is None or writer.error is None:
            raise  # a RuntimeError that is not about the disk: a bug, with its traceback
        raise cannot_write(path, writer.error) from None
    finally:
        tmp.unlink(missing_ok=True)


def others(folder: Path, own: tuple[str, ...]) -> list[str]:
    """The files in `folder` (not its subfolders, nor hidden files: locks, temporary files) that match none
    of the glob patterns `own`: someone else's, which a tool must not write among."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not any(fnmatch.fnmatch(p.name, pattern) for pattern in own))


def check_replaceable(path: Path, marks: tuple[bytes, ...], setting: str, tool: str) -> None:
    """Refuse to replace a file that `tool` did not write: its files hold one of `marks` (a key of its JSON,
    the metadata of its pictures)."""
    content = path.read_bytes() if path.is_file() else None
    if content is not None and not any(mark in content for mark in marks):
        raise FileError(f"{setting} {path} exists and {tool} did not write it, so it will not replace it; "
                        "choose another name")


def cannot_write(path: Path, e: OSError) -> FileError:
    return FileError(f"cannot write {path} ({e.strerror or e}); check that the folder exists, is writable and "
                     "has free space, or choose another one")


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def finite(value):
    """`value` with every NaN or infinity replaced by None: JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: str | Path, value, indent: int = 2) -> None:
    """Valid JSON, atomically: a value that is not a finite number is written as null."""
    atomic_write_text(path, json.dumps(finite(value), indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def sync_folder(folder: str | Path) -> None:
    """fsync a folder, so that a rename inside it survives a power cut too."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folder(folder: str | Path, setting: str) -> Path:
    """mkdir -p, with a one-line error naming the setting when it cannot be made."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "is a file" if isinstance(e, FileExistsError) else f"cannot be made ({e.strerror})"
        raise FileError(f"{setting} = {str(folder)!r} {what}; choose another folder") from None
    if not os.access(folder, os.W_OK):
        raise FileError(f"{setting} = {str(folder)!r} is not writable; choose another folder")
    return folder


@contextlib.contextmanager
def lock(path: str | Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock file `path` while writing what it guards; refuse when another process holds it, or
    with `wait`, say so and wait for it to finish.

    The lock is the operating system's (flock): it is released when the process ends, however it
    ends, so a lock file left behind by a killed process is never mistaken for a live one. The file is
    removed on the way out, while still locked; so a process that opened it just before must check,
    once it holds the lock, that the file is still the one at `path`, and otherwise lock the new one."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            if not wait:
                f.close()
                raise FileError(f"{what} is in use by another process (PID {holder}); wait for it to finish, or "
                                "choose another folder") from None
            print(f"{what} is in use by another process (PID {holder}): waiting for it to finish", file=sys.stderr,
                  flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        f.close()  # its holder removed it as we opened it
    try:
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        f.close()  # releases the lock


def staging_folder(out: Path) -> Path:
    """A new empty folder beside `out` whose name no other process (or user) has: this process's own."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise FileError(f"cannot write into {out.parent} ({e.strerror}); choose another folder") from None
    return readable(folder)


def readable(path: Path) -> Path:
    """Give `path` the usual permissions (0644 for files, 0755 for folders, less what the umask removes):
    mkdtemp creates its folder readable by its owner only."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    return path


def publish(out: Path, names: list[str], stale: tuple[str, ...]) -> None:
    """Rename prepared splits' temporary files (name.tmp) into place, after removing meta.json (the folder
    is not complete until it is written again), and remove the `stale` ones an earlier prepare left."""
    (out / "meta.json").unlink(missing_ok=True)
    for name in names:
        os.replace(out / f"{name}.tmp", out / name)
    for name in set(stale) - set(names):  # the other format's, from an earlier prepare
        (out / name).unlink(missing_ok=True)
    sync_folder(out)  # the renames are on the disk before meta.json, written next, says the folder is whole
