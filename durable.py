"""Durable writes: a free-space check before a write, then temp file -> flush -> fsync -> rename, and nothing left
behind when the write fails part-way (a full disk, a quota, a read-only mount).

    durable.check_space(folder, nbytes, "the checkpoint")    # DiskFull (one line) before anything is written
    durable.write_atomic(path, lambda f: f.write(data), nbytes, "config.json")   # the temp file goes on failure

Every writer of the project (train.py's checkpoints, logs and config.json, tree.py's trees, prepare.py's shards)
goes through here, so a full disk is one line from each of them and never a half-written file where a whole one
was. The free-space check is a courtesy (it fails before any byte is written, with the figures); the cleanup on
failure is the guarantee, since another process can fill the disk between the check and the write.
"""
import errno
import os

MARGIN = 1 << 20  # bytes a write leaves free beyond its own size (directory entries, the line that reports it)


class DiskFull(OSError):
    """Not enough free space for a write, found before it started; str() is one line with the figures."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self):
        return self.strerror


def free_bytes(path: str) -> int:
    """Bytes this user may still write on the filesystem holding `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_space(path: str, nbytes: int, what: str):
    """Raise DiskFull unless the filesystem holding `path` has room for `nbytes` (plus MARGIN)."""
    free = free_bytes(path)
    if nbytes + MARGIN > free:
        raise DiskFull(f"no room for {what} in {os.path.abspath(path)}: it needs {mib(nbytes + MARGIN)}, the disk "
                       f"has {mib(free)} free")


def reason(e: OSError) -> str:
    """One line for a failed write: DiskFull's own text, else the OS's words ('No space left on device')."""
    return str(e) if isinstance(e, DiskFull) else e.strerror or str(e)


def remove_quietly(path: str):
    try:
        os.remove(path)
    except OSError:
        pass


def fsync_dir(path: str):
    """Make the names in folder `path` durable (a rename, a new file), where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported everywhere; the data itself is already fsynced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, write, nbytes: int | None = None, what: str | None = None):
    """write(f) into a temp file beside `path`, flush, fsync, os.replace, fsync the folder; returns write's result.
    With `nbytes` the free space is checked first (DiskFull). On any failure, or an exception from `write`, the temp
    file is removed and `path` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    if nbytes is not None:
        check_space(folder, nbytes, what or os.path.basename(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, or Ctrl-C while loading/training: never a half file under either name
        remove_quietly(tmp)
        raise
    fsync_dir(folder)
    return result
