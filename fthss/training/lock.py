"""One training run per output folder: two runs on one `--out` would resume from each other's
checkpoints and write the same steps twice into the metrics log.

The lock is an `fcntl.flock` on `OUT/.fthss-train.lock`, which holds the holder's pid for the
message to the second run. The kernel drops the lock when its holder exits, however it ends
(killed included), so a stale file never blocks a rerun. POSIX only: elsewhere (no `fcntl`)
runs are not locked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fthss.errors import RunLockedError

LOCK_FILE = ".fthss-train.lock"


@contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder`'s training lock for the block; RunLockedError naming the holder's pid if
    another process holds it. A folder that cannot be written fails here, before any work."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise RunLockedError(f"{folder}: another training run (pid {holder}) is writing "
                                 "into this folder; wait for it to end, or choose another "
                                 "--out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
