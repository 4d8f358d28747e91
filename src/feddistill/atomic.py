"""Atomic file writes: write to a temp file beside the target, then rename over it, so a
reader (or a resumed run after a kill) never sees half a file. Every file feddistill writes
whole goes through :func:`atomic_path` (appends to a journal are fsync'd appends instead)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(
    path: str | os.PathLike[str],
    *,
    mode: int | None = None,
    durable: bool = False,
    previous: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Yield a temp path (same folder, same suffix); on success it replaces `path`.

    mode: create the temp file with exactly these permissions before anything is written
    (0o600 for private keys: never readable by others, not even briefly).
    durable: fsync the file and its folder, so the new version survives a power cut.
    previous: keep the version `path` holds now (if any) there, renamed just before the new
    one takes its place: a reader finds both versions, or for an instant only the previous one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        if mode is not None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            os.fchmod(fd, mode)  # the umask must not loosen or tighten it
            os.close(fd)
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        if previous is not None and path.is_file():
            os.replace(path, previous)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:  # persists the rename itself; not possible on every platform
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike[str], data: Any, *, allow_nan: bool = True) -> None:
    """``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, allow_nan=allow_nan)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path, error: type[Exception], missing: str):
    """A JSON file a command needs: ``error`` naming the file when it is absent (with the
    ``missing`` hint) or corrupt."""
    if not path.is_file():
        raise error(f"{path}: not found; {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: corrupt ({exc})") from exc
