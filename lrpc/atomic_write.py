"""Writing files atomically (a temp file renamed into place) and never over one of the command's inputs."""
from __future__ import annotations

import contextlib
import os
import re
import select
import sys
import tempfile
from pathlib import Path

from .errors import InputError


def write_atomic(data, path: str | os.PathLike, protect=()) -> None:
    """Write ``data`` (bytes, str, a list of bytes pieces, or a callable making one of those once the path is
    checked) to ``path`` through a temp file + rename, with the permissions a plain ``open`` would give (umask
    applied); refuse to overwrite any of ``protect`` (:func:`refuse_inputs`); errors name the path.

    A symbolic link at ``path`` stays: the file it points to is replaced. A path naming one of this process's open
    files (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``) is written to that descriptor, where it stands (a
    redirected stdout keeps what was printed before); another path that is not a regular file (``/dev/null``, a
    FIFO) is written into: there is nothing to replace, and a rename would put a regular file where it was."""
    p = Path(path)
    refuse_inputs(p, protect)
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an output file path")
    descriptor = _descriptor(p)
    special = descriptor is None and p.exists() and not p.is_file()
    if p.is_symlink() and descriptor is None and not special:  # (a dangling link: its target is created)
        p = Path(os.path.realpath(p))
    if not p.parent.exists():
        raise InputError(f"{p.parent}: output folder does not exist")
    if callable(data):
        data = data()
    if isinstance(data, str):
        data = data.encode()
    pieces = data if isinstance(data, list) else [data]
    try:
        if descriptor is not None:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for piece in pieces:
                view = memoryview(piece).cast("B")
                while view:
                    try:
                        view = view[os.write(descriptor, view):]
                    except BlockingIOError:  # (a non-blocking pipe that is full: wait until it takes more)
                        select.select([], [descriptor], [])
            return
        if special:
            with open(p, "wb") as f:
                for piece in pieces:
                    f.write(piece)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise InputError(f"{p}: cannot write ({e.strerror or type(e).__name__})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in pieces:
                f.write(piece)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        _replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"{p}: cannot write ({e.strerror or type(e).__name__})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _descriptor(p: Path) -> int | None:
    """The open file descriptor of this process that ``p`` names, else None: ``/dev/fd/N``, ``/proc/self/fd/N``
    (``thread-self``, this process's pid), or any path to the very file stdout or stderr is (``/dev/stdout``, a
    link to it, the log file stdout is redirected into)."""
    text = os.path.normpath(str(p))
    m = re.fullmatch(r"/(?:dev/fd|proc/(?:self|thread-self|(\d{1,9}))/fd)/(\d{1,9})", text, flags=re.ASCII)
    if text in ("/dev/stdin", "/dev/stdout", "/dev/stderr"):
        return ("/dev/stdin", "/dev/stdout", "/dev/stderr").index(text)
    if m and (m.group(1) is None or int(m.group(1)) == os.getpid()):
        candidates = [int(m.group(2))]
    else:
        candidates = [1, 2]
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    for fd in candidates:
        with contextlib.suppress(OSError):
            open_file = os.fstat(fd)
            if (open_file.st_dev, open_file.st_ino) == (st.st_dev, st.st_ino):
                return fd
    return None


def protected(protect) -> dict:
    """``protect`` (paths or ``(path, what)`` pairs) as ``{(device, inode): (path, what)}`` of the files that
    exist, for :func:`refuse_inputs` (one stat per file, however many outputs are checked against them)."""
    if isinstance(protect, dict):
        return protect
    out = {}
    for entry in protect:
        q, what = entry if isinstance(entry, tuple) else (entry, "the model")
        if q is None:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(q)
            out.setdefault((st.st_dev, st.st_ino), (q, what))
    return out


def refuse_inputs(path: str | os.PathLike, protect) -> None:
    """InputError if ``path`` is one of the files in ``protect`` (through any symbolic or hard link): a
    :func:`protected` dict, or paths and ``(path, what)`` pairs, ``what`` naming the file in the message
    (default "the model")."""
    try:
        st = os.stat(path)
    except OSError:
        return
    hit = protected(protect).get((st.st_dev, st.st_ino))
    if hit is not None:
        raise InputError(f"{Path(path)}: refusing to overwrite an input file ({hit[1]})")


def _replace(tmp: str, path: Path) -> None:
    """``os.replace(tmp, path)``; onto an existing file on Linux as an atomic exchange of the two names (renameat2
    RENAME_EXCHANGE) and the old file's removal. ext4 writes a file's data out before a rename over another file
    (its ``auto_da_alloc`` guard for programs that do not fsync), which makes replacing a big output much
    slower than writing a new one. Either way a reader of ``path`` sees the old file or the whole new one; after a power
    loss the new one is as safe as a newly written file (lrpc does not fsync its outputs). Where the exchange is
    not to be had (another system, a file system without it), ``os.replace``."""
    if sys.platform.startswith("linux") and path.exists() and not path.is_symlink() and _exchange(tmp, path):
        with contextlib.suppress(OSError):  # (the new file is in place: this only removes the old one)
            os.unlink(tmp)
        return
    os.replace(tmp, path)


def _exchange(a: str, b: Path) -> bool:
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # (no renameat2 in this C library)
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0
