"""Writing files safely: a reader, a resumed run or a power cut never meets half a file.

A file that matters (checkpoint, log, prepared data, export) is written under a temporary name in
the same folder, flushed to the disk (fsync), then renamed over its final name. A rename is atomic,
so the final name always holds either the old complete file or the new complete one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from errors import UserError


class FileError(UserError):
    """A file or folder that cannot be written; the message names it and what to do."""


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file for writing in binary; on success it replaces `path`, on failure it goes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share it
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the name points at them
        os.replace(tmp, path)
        sync_folder(path.parent)
    except OSError as e:
        raise FileError(f"cannot write {path} ({e.strerror or e}); check that the folder exists, is "
                        "writable and has free space, or choose another one") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def sync_folder(folder: str | Path) -> None:
    """fsync a folder, so that a rename inside it survives a power cut too."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
