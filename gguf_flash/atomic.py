"""Files that appear whole or not at all, and the locks that serialize their writers.

`atomic_output(dst)` yields a temporary path next to `dst` (`.{name}.{random}.tmp`), renamed onto `dst`
only when the block finishes; on an exception (Ctrl-C, a full disk, ...) the temporary file is removed.
A writer killed with SIGKILL cannot clean up, so each temporary file is flock'ed by its writer for its
whole life: the next writer of the same `dst` removes every temporary file whose lock it can take
(the kernel releases a dead process's locks), and never one that is still being written.

`exclusive(lock_path)` is a blocking inter-process lock (flock on a small lock file), e.g. two
processes fetching the same model: the second waits, then finds the first one's verified file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError


def _temp_glob(dst: Path) -> str:
    return f".{dst.name}.*.tmp"


def sweep_stale(dst) -> list:
    """Remove the temporary files of `dst` left by writers that died; returns the removed paths."""
    dst = Path(dst)
    removed = []
    for tmp in dst.parent.glob(_temp_glob(dst)):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:          # a live writer holds it
            os.close(fd)
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_output(dst):
    """Yields a locked temporary path; renames it onto dst when the block succeeds. An OSError while
    the block writes (ENOSPC, EFBIG, EACCES ...) becomes an OutputError naming dst."""
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    sweep_stale(dst)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise OutputError(f"{dst}: cannot create a file in {parent} ({e.strerror})") from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
            os.replace(tmp, dst)
        except OSError as e:
            raise write_error(dst, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def write_error(dst, e: OSError) -> OutputError:
    """The one-line error for an OSError while writing dst or a scratch file beside it (the converter's
    spill files): "DST: cannot write (disk full); nothing was written there"."""
    dst = Path(dst)
    return OutputError(f"{dst}: cannot write ({_why(e, dst.parent if str(dst.parent) else Path('.'))}); "
                       "nothing was written there")


def _why(e: OSError, parent: Path) -> str:
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "disk full"
    if e.errno is None:        # numpy's tofile reports a short write without an errno
        try:
            free = shutil.disk_usage(parent).free
        except OSError:
            free = None
        return f"disk full, {free:,} bytes free" if free is not None and free < 1 << 20 else str(e)
    return e.strerror or str(e)


@contextlib.contextmanager
def exclusive(lock_path):
    """Hold an exclusive flock on lock_path (created if missing) for the block; blocks until free."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)        # closing the last descriptor releases the lock
