"""Durable file replacement: the one way megachat writes a file that must never be seen half-written.

Write to a temp file beside the target, fsync it, rename it over the target, fsync the directory: a crash at any
point leaves either the old file or the new one. A write that fails (a full disk, an I/O error, a read-only
directory) removes its temp file and leaves the target as it was; `write_error` says which path, how many bytes it
needed and how many are free. Imports nothing heavy (the data tools must not import torch).
"""
import contextlib
import json
import os
import shutil


def replace_durably(tmp: str, path: str) -> None:
    """fsync the finished temp file `tmp`, rename it to `path`, fsync the directory so the rename survives a crash."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: str, error: OSError, needed: int) -> OSError:
    """`error`, met writing `path`, restated with the bytes the write needed and the bytes free on that filesystem."""
    try:
        free = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free:,}"
    except OSError:
        free = "an unknown number of"
    return OSError(error.errno, f"cannot write {path} ({error.strerror or error}): it needs {needed:,} bytes, {free} "
                                f"bytes are free on its filesystem")


def atomic_write(path: str, data: bytes | str) -> None:
    """Replace `path` with `data` (str is written as UTF-8) atomically and durably; on failure (OSError from
    write_error) the temp file is removed and `path` is untouched."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        replace_durably(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_error(path, e, len(data)) from e


def atomic_write_json(path: str, obj, indent: int = 1) -> None:
    atomic_write(path, json.dumps(obj, indent=indent))
