"""Atomic file writes: a temp file in the same folder, flushed to disk, then renamed into place.
A crash leaves either the old file or the new one, never half of one. Every file fthss writes
(stages, checkpoints, results, reports) goes through here."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

# The umask can only be read by setting it: read it once, at import, and put it back.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a plain open() would not
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise named(err, path) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def named(err: OSError, path: str | Path) -> OSError:
    """`err` with the file it is about: a write that fills the disk reports no file name, and
    the message the user sees must name one."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable: it lives in the directory's entry list (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> str:
    """Write `tensors` as a safetensors file; returns the sha256 of the bytes written."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in blocks (checkpoint states can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PartialFile:
    """A text file written piece by piece: each piece goes to `PATH.partial` and onto the disk
    as it comes, and the file is renamed to PATH once complete (`commit`). A run that fails
    part way, or whose last rename fails (a full disk, a folder made read-only), leaves every
    finished piece in `PATH.partial`. Opening it fails at once where the file cannot be
    written, before any work it would hold is done."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.partial, "w", encoding="utf-8")  # noqa: SIM115 (closed in commit)

    def write(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:
            raise named(err, self.partial) from err

    def commit(self) -> None:
        self._file.close()
        os.replace(self.partial, self.path)
        _fsync_directory(self.path.parent)

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()  # after a failure the partial file stays, with what was written
