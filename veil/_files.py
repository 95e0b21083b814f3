"""Files that hold secrets."""
from __future__ import annotations

import os


def write_private(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` readable and writable by the owner only (0600). The
    mode is set before the secret goes in, also when the file already existed with a
    looser one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(data)
