"""Files that hold secrets."""
from __future__ import annotations

import os
import tempfile


def write_private(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` readable and writable by the owner only (0600). The
    mode is set before the secret goes in, also when the file already existed with a
    looser one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(data)


def private_dir(path: str | os.PathLike) -> "os.PathLike":
    """Make directory ``path`` (and missing parents) owner-only (0700) where this call
    creates it; an existing directory keeps its mode (it may be shared, like ``/tmp``),
    so secrets go in a subdirectory this creates."""
    from pathlib import Path

    d = Path(path)
    missing = []
    p = d
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(p, 0o700)   # mkdir's mode is filtered by the umask
    return d


def unnamed_file(directory: str | os.PathLike | None = None) -> int:
    """A new read-write file in ``directory`` (default: the temporary folder) that never
    has a name (Linux ``O_TMPFILE``; else created and unlinked at once, a name existing
    for that instant): only this process's descriptor refers to it, and its space is
    freed when the descriptor closes, also when the process dies."""
    directory = os.fspath(directory or tempfile.gettempdir())
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            return os.open(directory, flag | os.O_RDWR, 0o600)
        except OSError:         # a file system without O_TMPFILE support
            pass
    fd, name = tempfile.mkstemp(prefix="veil-", suffix=".bin", dir=directory)
    os.unlink(name)
    return fd
